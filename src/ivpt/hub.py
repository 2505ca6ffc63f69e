"""Adapters on the Hugging Face Hub: ``hf-hub:org/name[@revision]`` to read, ``push_to_hub`` to publish.

Reading goes through ``huggingface_hub`` itself: its cache (``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1``
to use only that cache, and tokens from its own login. An adapter repository holds exactly an
adapter folder: adapter.safetensors, adapter_config.json and the model card README.md.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from .adapter_format import CONFIG_FILE, TENSORS_FILE, AdapterError, read_adapter_config, write_card, write_config_copy
from .card import CARD_FILE
from .extras import require

PREFIX = "hf-hub:"
ADAPTER_FILES = (TENSORS_FILE, CONFIG_FILE, CARD_FILE)
OFFLINE_HINT = ("to work offline, download it once with network access (huggingface-cli download REPO) and set "
                "HF_HUB_OFFLINE=1, or pass a local adapter folder")


def is_hub_name(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_hub_name(source: str) -> tuple[str, str | None]:
    """'hf-hub:org/name@rev' -> ('org/name', 'rev')."""
    name = source[len(PREFIX):]
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise AdapterError(f"{source!r}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def snapshot(repo: str, revision: str | None, *, what: str, error: type[Exception], hint: str, purpose: str,
             repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """The snapshot folder of a Hub repository through huggingface_hub (its cache, token and HF_HUB_OFFLINE),
    every failure raised as ``error`` naming ``what`` and ending in ``hint`` (the way forward)."""
    hub = require("huggingface_hub", purpose)
    from huggingface_hub import errors

    from .reach import hub_unreachable

    kind = "dataset repository" if repo_type == "dataset" else "repository"
    where = f"{kind} {repo}" + (f" at revision {revision!r}" if revision else "")
    reason = hub_unreachable()  # no network: the cache at once, not after huggingface_hub's minute of retries
    try:
        return Path(hub.snapshot_download(repo, repo_type=repo_type, revision=revision,
                                          allow_patterns=allow_patterns, local_files_only=bool(reason)))
    except errors.RevisionNotFoundError:
        raise error(f"{what}: {kind} {repo} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise error(f"{what}: no {kind} {repo} (or no access: log in with huggingface-cli login for a private "
                    "or gated one)") from None
    except errors.LocalEntryNotFoundError:
        raise error(f"{what}: {where} is not in the Hub cache and the Hub cannot be reached"
                    + (f" ({reason})" if reason else "") + "; " + hint) from None
    except (OSError, errors.HfHubHTTPError) as err:
        raise error(f"{what}: could not fetch {where} ({err}); {hint}") from None


def pinned_name(source, folder: Path) -> str:
    """``source`` as it can be found again: a Hub name pinned to the commit its snapshot folder is named by
    (a branch such as main moves, and offline it may have come from an older cached snapshot)."""
    if not is_hub_name(source):
        return str(source)
    repo, _ = parse_hub_name(source)
    return f"{PREFIX}{repo}@{Path(folder).name}"


def resolve_adapter(source) -> Path:
    """A local adapter folder for ``source``: a path, or a Hub name fetched into (or read from) the Hub cache."""
    if not is_hub_name(source):
        return Path(source).expanduser()
    repo, revision = parse_hub_name(source)
    where = f"{repo}" + (f" at revision {revision!r}" if revision else "")
    folder = snapshot(repo, revision, what=f"Hub adapter {source}", error=AdapterError, hint=OFFLINE_HINT,
                      allow_patterns=list(ADAPTER_FILES), purpose="loading an adapter by Hub name")
    missing = [f for f in (TENSORS_FILE, CONFIG_FILE) if not (folder / f).is_file()]
    if missing:
        raise AdapterError(f"Hub adapter {source}: {where} has no {' and no '.join(missing)}: is it an ivpt adapter?")
    return folder


def stage(source, folder: Path, protocol: dict | None = None) -> Path:
    """Write into ``folder`` exactly what a push uploads: the adapter files and a fresh model card."""
    source = Path(source)
    summary = None
    if (source / "summary.json").is_file() and (source / "final").is_dir():  # an ivpt tune folder
        summary = source / "summary.json"
        seeds = json.loads(summary.read_text()).get("seeds") or []
        source = source / "final" / f"seed{seeds[0]}" if seeds else source
    if (source / "adapter" / TENSORS_FILE).is_file():  # a run folder
        source = source / "adapter"
    config = read_adapter_config(source)  # checks it is an adapter; the config the loader uses
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / TENSORS_FILE, folder / TENSORS_FILE)
    if config.get("format_version", 1) < 2:  # format 1: the JSON is the config itself
        shutil.copyfile(source / CONFIG_FILE, folder / CONFIG_FILE)
    else:  # the readable copy written fresh from the config inside the tensor file, never a stale one
        write_config_copy(folder, config)
    summary = summary or source.parent / "summary.json"
    if protocol is None and summary.is_file():
        protocol = json.loads(summary.read_text())
    write_card(folder, config, protocol)
    paths = local_paths(config)
    if paths:  # recorded for reloading on this machine; on the Hub they only tell where things were
        warnings.warn(f"{source}: the adapter's config and card record local paths ({', '.join(paths[:6])}"
                      f"{', ...' if len(paths) > 6 else ''}); they are uploaded with it, public if the repository "
                      "is (see them with --dry-run DIR)", stacklevel=2)
    return folder


def local_paths(value, where: str = "") -> list[str]:
    """The fields (dotted) of a config that hold absolute paths of this machine."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in local_paths(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in local_paths(item, f"{where}[{i}]")]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value)
                                   or re.search(r"(^|\s)/\S+/", value)):
        return [where]
    return []


def push_to_hub(source, repo_id: str, *, private: bool | None = None, dry_run=None, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload an adapter folder (or a run folder holding adapter/, or an ``ivpt tune`` folder: its first seed's
    adapter, with every seed's test score in the card) with its card to ``repo_id``.

    private: None (the default) leaves a new repository's visibility to the Hub (an organisation's default);
    True or False asks for it, and a repository that already exists with the other visibility is refused
    before anything is uploaded. dry_run: a new or empty folder to write the exact upload into instead
    (nothing is sent). Returns ``hf-hub:REPO@COMMIT``, the pushed revision pinned, or the dry-run folder.
    """
    parse_hub_name(PREFIX + repo_id)
    if dry_run is not None:
        target = Path(dry_run)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise AdapterError(f"dry run: {target} exists and is not an empty folder; name a new or empty folder "
                               "for --dry-run (nothing in it was changed)")
        return str(stage(source, target))
    hub = require("huggingface_hub", "publishing an adapter")
    from huggingface_hub import errors

    if private is None and _version(hub.__version__) < (0, 27):  # older create_repo sends private=False itself
        raise AdapterError(f"huggingface_hub {hub.__version__} creates every new repository public unless told: "
                           "upgrade it (pip install 'ivpt[hub]', >= 0.27) or ask with --private or --public")

    from .reach import hub_unreachable

    with tempfile.TemporaryDirectory() as tmp:
        staged = stage(source, Path(tmp) / "upload")
        reason = hub_unreachable()  # said in seconds, not after huggingface_hub's minute of retries
        if reason:
            raise AdapterError(f"cannot push to {repo_id}: the Hub cannot be reached ({reason}); nothing was sent. "
                               "Check the upload with --dry-run DIR and push from a machine with network access")
        api = hub.HfApi(token=token)
        try:
            # private=None is not sent: the Hub then applies its (or the organisation's) default
            api.create_repo(repo_id, exist_ok=True, **({} if private is None else {"private": private}))
            if private is not None:  # create_repo ignores visibility for a repository that already exists
                _check_visibility(repo_id, private, api.repo_info(repo_id).private)
            commit = api.upload_folder(folder_path=str(staged), repo_id=repo_id,
                                       commit_message=commit_message or f"ivpt adapter from {Path(source).name}")
        except errors.OfflineModeIsEnabled:
            raise AdapterError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it, or check the upload "
                               "with --dry-run DIR") from None
        except (OSError, errors.HfHubHTTPError) as err:
            raise AdapterError(f"cannot push to {repo_id}: {err}") from None
    return f"{PREFIX}{repo_id}@{commit.oid}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _check_visibility(repo_id: str, asked_private: bool, is_private) -> None:
    asked = "private" if asked_private else "public"
    if is_private is None:
        raise AdapterError(f"cannot push to {repo_id}: a {asked} repository was asked for, and the Hub did not "
                           "say whether it is private; nothing was uploaded")
    if bool(is_private) != asked_private:
        actual = "private" if is_private else "public"
        raise AdapterError(f"cannot push to {repo_id}: it already exists and is {actual}, but a {asked} repository "
                           f"was asked for ({'--private' if asked_private else '--public'}, private={asked_private}); "
                           "nothing was uploaded. Change its "
                           "visibility in the repository's settings on the Hub first, or push without asking for "
                           "one")


def push_model(model, repo_id: str, **kwargs) -> str:
    """``model.push_to_hub``: save the adapter into a temporary folder, then push it with its card."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(Path(tmp) / "adapter")
        return push_to_hub(Path(tmp) / "adapter", repo_id, **kwargs)
