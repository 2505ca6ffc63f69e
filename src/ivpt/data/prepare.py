"""Prepare VTAB-1k and FGVC from what is shared: a Hub dataset repository, an archive or a folder.

A task is extracted into ``DIR/.partial/<task>``, verified there (:mod:`ivpt.data.check`), given its
record (``ivpt-task.json``) and only then renamed to ``DIR/<task>``: a killed run never leaves a task
that reads as whole, and a rerun prepares only the tasks still missing. The manifest
``DIR/ivpt-data.json`` (source, revision, per-task counts, image format, sha256 of each list file) is
written last, from the records of the tasks in place.

    from ivpt.data.prepare import prepare_vtab, prepare_fgvc
    prepare_vtab("hf-hub:XiN0919/VTAB-1k", "data/vtab-1k", tasks=["dtd", "kitti"])
    prepare_fgvc("CUB_200_2011", ["CUB_200_2011.tgz"], "hf-hub:XiN0919/FGVC", "data/fgvc")
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import sys
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

from ..progress import progress
from .check import (MANIFEST, TASK_RECORD, TaskReport, check_fgvc_dataset, check_fgvc_splits, check_vtab_task,
                    default_workers, read_manifest, task_record, vtab_task_for)
from .datasets import IMAGE_SUFFIXES, DataError, visible_files
from .fgvc import FGVC_DATASETS, FGVC_SPLITS
from .paths import absolute_path
from .vtab import VTAB_SPLITS, VTAB_TASKS

DEFAULT_VTAB_SOURCE = "hf-hub:XiN0919/VTAB-1k"  # vtab-1k.zip, linked from V-PETL Bench
DEFAULT_FGVC_SPLITS = "hf-hub:XiN0919/FGVC"  # json.zip: VPT's split files, re-hosted
PARTIAL = ".partial"
DATA_SUFFIXES = (".txt", ".json") + IMAGE_SUFFIXES  # files that make a folder a data folder, not one of archives
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

FGVC_SPELLINGS = {
    "cub": "CUB_200_2011", "cub200": "CUB_200_2011", "cub_200_2011": "CUB_200_2011", "nabirds": "nabirds",
    "oxfordflower": "OxfordFlower", "oxfordflowers": "OxfordFlower", "flowers": "OxfordFlower",
    "oxford_flowers": "OxfordFlower", "flowers102": "OxfordFlower", "stanforddogs": "StanfordDogs",
    "stanford_dogs": "StanfordDogs", "dogs": "StanfordDogs", "stanfordcars": "StanfordCars",
    "stanford_cars": "StanfordCars", "cars": "StanfordCars",
}


def fgvc_dataset_name(dataset: str) -> str:
    """ivpt's name of an FGVC dataset as asked for, refusing an unknown one."""
    name = fgvc_dataset_for(dataset)
    if name is None:
        raise DataError(f"unknown FGVC dataset {dataset!r}; expected one of {', '.join(FGVC_DATASETS)} "
                        f"(or {', '.join(sorted(FGVC_SPELLINGS))})")
    return name


def fgvc_dataset_for(name: str) -> str | None:
    key = name.lower().replace("-", "_").replace(" ", "_")
    return next((d for d in FGVC_DATASETS if d.lower() == key), None) or FGVC_SPELLINGS.get(key)


# -- sources -------------------------------------------------------------------------------------
@dataclass
class Fetched:
    path: Path
    source: str  # as recorded: a Hub name, or an absolute path
    revision: str | None = None  # the Hub commit read


def fetch(source: str) -> Fetched:
    """A local path for ``source``: a Hub dataset repository through huggingface_hub (its cache, token and
    HF_HUB_OFFLINE), or a local archive or folder."""
    from ..hub import is_hub_name, parse_hub_name, snapshot

    if not is_hub_name(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{source}: no such file or folder; expected hf-hub:OWNER/NAME[@REVISION], an archive "
                            f"({', '.join(ARCHIVE_SUFFIXES)}) or a folder")
        return Fetched(path, absolute_path(path))
    try:
        repo, revision = parse_hub_name(source)
    except ValueError as err:
        raise DataError(str(err)) from None
    hint = ("download it once with network access (or huggingface-cli download --repo-type dataset REPO), then "
            "HF_HUB_OFFLINE=1 reads the cache; or pass a local archive or folder with --from")
    folder = snapshot(repo, revision, what=source, error=DataError, hint=hint, repo_type="dataset",
                      purpose="downloading data from the Hugging Face Hub")
    return Fetched(folder, source, folder.name)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


class Archive:
    """Files of a source by relative POSIX name, extracted to chosen paths. ``streaming``: read in one pass only
    (a compressed tar), so extract everything wanted at once."""
    streaming = False

    def __init__(self, path: Path):
        self.path = path

    def names(self) -> list[str]:
        raise NotImplementedError

    def extract(self, wanted: Mapping[str, Path], desc: str) -> None:
        raise NotImplementedError


class FolderArchive(Archive):
    def names(self) -> list[str]:
        return [p.relative_to(self.path).as_posix() for p in visible_files(self.path)]

    def extract(self, wanted, desc):
        for name, dest in progress(wanted.items(), desc=desc, total=len(wanted)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path / name, dest)


class ZipArchive(Archive):
    def names(self) -> list[str]:
        with damaged(self.path), zipfile.ZipFile(self.path) as archive:
            return [i.filename for i in archive.infolist() if not i.is_dir()]  # zip names carry no './'

    def extract(self, wanted, desc):
        with damaged(self.path), zipfile.ZipFile(self.path) as archive:
            for name, dest in progress(wanted.items(), desc=desc, total=len(wanted)):
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)


def member_name(name: str) -> str:
    """An archive member's name as a plain relative path ('./vtab-1k/dtd/x' and 'vtab-1k/dtd/x' alike)."""
    return PurePosixPath(name).as_posix()


class TarArchive(Archive):
    streaming = True

    @contextmanager
    def _members(self):
        """The archive's members in one pass. Python's tarfile takes a stream that ends early at a member
        boundary for the archive's end, so the end is checked here: the compressed stream read to its
        end-of-stream marker, a plain tar's last member within the file."""
        with damaged(self.path), open(self.path, "rb") as raw:
            magic = raw.read(6)
            raw.seek(0)
            opener = {b"\x1f\x8b": gzip.GzipFile, b"BZh": bz2.BZ2File, b"\xfd7zXZ": lzma.LZMAFile}
            stream = next((o(fileobj=raw) if o is gzip.GzipFile else o(raw)
                           for m, o in opener.items() if magic.startswith(m)), raw)
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                yield archive
                size = os.fstat(raw.fileno()).st_size
                last = archive.members[-1] if archive.members else None
                if stream is raw and last is not None and last.offset_data + last.size > size:
                    raise tarfile.ReadError(f"member {last.name} ends after the file does")
                while stream.read(1 << 20):  # a compressed stream cut short raises EOFError here
                    pass

    def names(self) -> list[str]:
        with self._members() as archive:
            return [member_name(m.name) for m in archive if m.isfile()]

    def extract(self, wanted, desc):
        left = dict(wanted)
        with self._members() as archive:
            for member in progress(iter(archive), desc=desc):
                dest = left.pop(member_name(member.name), None)
                if dest is not None and member.isfile():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with archive.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)


@contextmanager
def damaged(path: Path):
    """Read errors of an archive as one clear message: almost always an interrupted download."""
    try:
        yield
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as err:
        cached = "/snapshots/" in Path(path).as_posix()
        way = ("delete it from the Hub cache (huggingface-cli delete-cache) and run again to download it anew"
               if cached else "download it again")
        raise DataError(f"archive {path} is incomplete or damaged ({type(err).__name__}: {err}): {way}") from None


def open_archives(path: Path) -> list[Archive]:
    """The archive(s) a fetched source holds: itself, or a folder of files, or a folder of archives (a Hub
    snapshot holding vtab-1k.zip)."""
    if path.is_file():
        if not is_archive(path):
            raise DataError(f"{path}: not an archive ivpt reads; expected one of {', '.join(ARCHIVE_SUFFIXES)} or a "
                            "folder")
        return [ZipArchive(path) if path.name.lower().endswith(".zip") else TarArchive(path)]
    files = visible_files(path)
    archives = [p for p in files if is_archive(p)]
    data = [p for p in files if p.suffix.lower() in DATA_SUFFIXES and not is_archive(p)]
    if archives and not data:  # e.g. a Hub snapshot: vtab-1k.zip beside a README
        return [a for p in archives for a in open_archives(p)]
    return [FolderArchive(path)]


def safe_destination(base: Path, relative: str) -> Path:
    """``base / relative`` for a name read from an archive, refused when it would leave ``base``."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise DataError(f"archive member {relative!r} would be written outside {base}; refusing the archive")
    return base.joinpath(*parts)


# -- the output folder ---------------------------------------------------------------------------
def prepared_tasks(out: Path) -> dict[str, dict]:
    """Task folders of ``out`` that ivpt prepared and verified: name -> record."""
    return {path.parent.name: task_record(path.parent) for path in sorted(Path(out).glob(f"*/{TASK_RECORD}"))}


@contextmanager
def claimed(out, kind: str):
    """The output folder, held by this process alone (a second preparation into it fails at once, naming
    this one), and refused when it holds another benchmark's data."""
    from ..engine.runlock import RunLock

    out = Path(out).expanduser()
    with RunLock(out):
        manifest = read_manifest(out)
        if manifest and manifest.get("kind") != kind:
            raise DataError(f"{out} holds {manifest.get('kind')} data ({MANIFEST}); prepare {kind} into another "
                            "folder")
        yield out


def _staging(out: Path, task: str) -> Path:
    folder = out / PARTIAL / task
    if folder.exists():  # a killed run's leftovers: never trusted, started over
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _put_in_place(staging: Path, out: Path, report: TaskReport, source: str, revision: str | None,
                  extra: dict | None = None) -> None:
    """A verified task: its record written inside, then the folder renamed into place in one step."""
    record = {**report.record(), "source": source, "revision": revision, **(extra or {}),
              "prepared": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (staging / TASK_RECORD).write_text(json.dumps(record, indent=2))
    os.replace(staging, out / report.task)


def write_manifest(out: Path, kind: str, known: Iterable[str], incomplete: Mapping[str, str] | None = None) -> dict:
    """``DIR/ivpt-data.json`` from the records of the tasks in place, written last (atomically)."""
    from ..engine.checkpoint import atomic_write

    records = {t: r for t, r in prepared_tasks(out).items() if t in set(known)}
    sources = sorted({r["source"] for r in records.values()})
    manifest = {"kind": kind, "source": sources[0] if len(sources) == 1 else sources,
                "revision": sorted({r["revision"] for r in records.values() if r.get("revision")}) or None,
                "tasks": records, "missing": [t for t in known if t not in records],
                "incomplete": dict(incomplete or {}),
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return manifest


def _refuse_foreign(out: Path, task: str) -> None:
    if (out / task).exists() and not (out / task / TASK_RECORD).is_file():
        raise DataError(f"{out / task} exists but was not prepared by ivpt (no {TASK_RECORD}); move it away, or check "
                        f"it as it is with ivpt data check {out}")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- VTAB-1k -------------------------------------------------------------------------------------
def locate_vtab_tasks(archives: list[Archive]) -> dict[str, tuple[Archive, str]]:
    """task -> (archive, folder inside it): folders holding a VTAB-1k list file, named in any known spelling."""
    found: dict[str, tuple[Archive, str]] = {}
    lists = {f"{s}.txt" for s in VTAB_SPLITS}
    for archive in archives:
        folders = sorted({str(PurePosixPath(n).parent) for n in archive.names() if PurePosixPath(n).name in lists})
        for folder in folders:
            spelt = PurePosixPath(folder).name if folder != "." else _stem(archive.path.name)
            task = vtab_task_for(spelt)
            if task is None:
                raise DataError(f"{archive.path}: folder {folder!r} holds VTAB-1k list files, but {spelt!r} is no "
                                f"VTAB-1k task name ivpt knows ({', '.join(VTAB_TASKS)}, or another codebase's "
                                "spelling of one); rename it to one of them")
            if task in found:
                raise DataError(f"{archive.path}: VTAB-1k task {task} is there twice ({found[task][1]!r} and "
                                f"{folder!r}); keep one")
            found[task] = (archive, folder)
    return found


def _stem(filename: str) -> str:
    """'dtd.tar.gz' -> 'dtd': the name of a source that is itself one task folder."""
    lower = filename.lower()
    return filename[:-len(next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), ""))] or filename


def _members_under(folder: str, staging: Path, names: list[str]) -> dict[str, Path]:
    prefix = "" if folder == "." else folder + "/"
    return {n: safe_destination(staging, n[len(prefix):]) for n in names if n.startswith(prefix)}


def prepare_vtab(source: str = DEFAULT_VTAB_SOURCE, out="data/vtab-1k", tasks: Iterable[str] | None = None,
                 workers: int | None = None, expect: Mapping | None = None,
                 allow_duplicates: Iterable[str] = ()) -> dict:
    """Prepare (and verify) VTAB-1k tasks into ``out``; tasks already there are kept. Returns the manifest.

    Raises DataError naming every task that failed verification or that the source lacks, after the
    others are in place and the manifest is written.
    """
    wanted = vtab_task_names(tasks)
    with claimed(out, "vtab-1k") as out:
        for task in wanted:
            _refuse_foreign(out, task)
        done = set(prepared_tasks(out))
        todo = [t for t in wanted if t not in done]
        if done & set(wanted):
            _say(f"already prepared in {out}, kept: {', '.join(t for t in wanted if t in done)}")
        failed, lacking = {}, []
        if todo:
            fetched = fetch(source)
            archives = open_archives(fetched.path)
            found = locate_vtab_tasks(archives)
            lacking = [t for t in todo if t not in found]
            for archive in archives:
                here = [t for t in todo if t in found and found[t][0] is archive]
                if here:
                    failed.update(_vtab_from_archive(archive, here, found, fetched, out, workers or default_workers(),
                                                     expect, set(allow_duplicates)))
        incomplete = {**failed, **{t: f"not in {source}" for t in lacking}}
        manifest = write_manifest(out, "vtab-1k", VTAB_TASKS, incomplete)
    _raise_incomplete(source, wanted, failed, lacking, out)
    return manifest


def vtab_task_names(tasks: Iterable[str] | None) -> list[str]:
    """ivpt's names of the tasks asked for (any known spelling; None: all 19), refusing unknown or repeated ones."""
    if tasks is None:
        return list(VTAB_TASKS)
    names = [vtab_task_for(t) or t for t in tasks]
    unknown = [t for t, n in zip(tasks, names) if n not in VTAB_TASKS]
    if unknown:
        raise DataError(f"unknown VTAB-1k task {unknown[0]!r}; expected any of {', '.join(VTAB_TASKS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"VTAB-1k task {repeated[0]} is asked for twice; list each once")
    return names


def _vtab_from_archive(archive: Archive, tasks: list[str], found: dict, fetched: Fetched, out: Path, workers: int,
                       expect, allow_duplicates: set) -> dict[str, str]:
    names = archive.names()
    failed = {}
    # a compressed tar is read in one pass for every task; anything else task by task, so that a kill
    # loses at most the task in hand
    batches = [tasks] if archive.streaming else [[t] for t in tasks]
    for batch in batches:
        staged = {t: _staging(out, t) for t in batch}
        wanted = {}
        for task in batch:
            wanted.update(_members_under(found[task][1], staged[task], names))
        archive.extract(wanted, f"extracting {', '.join(batch)}" if len(batch) < 4 else f"extracting {archive.path.name}")
        for task in batch:
            report = check_vtab_task(staged[task], task, expect, workers, task in allow_duplicates)
            if report.ok:
                _put_in_place(staged[task], out, report, fetched.source, fetched.revision,
                              {"folder_in_source": found[task][1], "duplicates_allowed": task in allow_duplicates})
                _say(f"{task}: verified ({_counts_text(report)}; {'/'.join(report.formats)}) -> {out / task}")
            else:
                failed[task] = "; ".join(map(str, report.problems))
                _say(f"{task}: FAILED verification, not put in place (files left in {staged[task]}):\n  "
                     + "\n  ".join(map(str, report.problems)))
    return failed


def _counts_text(report: TaskReport) -> str:
    return ", ".join(f"{s} {n:,}" for s, n in report.counts.items())


def _raise_incomplete(source: str, wanted: list[str], failed: dict, lacking: list[str], out: Path) -> None:
    if not failed and not lacking:
        return
    lines = []
    if lacking:
        lines.append(f"{source} lacks {len(lacking)} of the {len(wanted)} tasks asked for: {', '.join(lacking)} (a "
                     "re-hosted archive may hold only some; get them from another source and run again with "
                     f"--from OTHER: the tasks already in {out} are kept)")
    for task, why in failed.items():
        lines.append(f"{task} failed verification: {why}")
    raise DataError("\n".join(lines))


# -- FGVC ----------------------------------------------------------------------------------------
def locate_split_files(archives: list[Archive], dataset: str) -> tuple[Archive, str]:
    """The (archive, folder) holding train/val/test.json for ``dataset``: a folder named like it, or the only one."""
    candidates = []
    for archive in archives:
        names = set(archive.names())
        for folder in sorted({str(PurePosixPath(n).parent) for n in names if PurePosixPath(n).name == "train.json"}):
            prefix = "" if folder == "." else folder + "/"
            if all(f"{prefix}{s}.json" in names for s in FGVC_SPLITS):
                candidates.append((archive, folder))
    named = [c for c in candidates if fgvc_dataset_for(PurePosixPath(c[1]).name) == dataset]
    if len(named) == 1 or len(candidates) == 1:
        return (named or candidates)[0]
    where = ", ".join(str(a.path) for a in archives)
    if not candidates:
        raise DataError(f"{where}: no folder with train.json, val.json and test.json (VPT's split files)")
    raise DataError(f"{where}: split files for {len(candidates)} folders ({', '.join(c[1] for c in candidates)}), none "
                    f"named like {dataset}; pass --splits the folder of {dataset}'s own")


def image_prefix(names: Iterable[str], keys: set[str]) -> str | None:
    """The folder inside an archive that the split files' image paths are relative to (None: none of them)."""
    for name in names:
        parts = name.split("/")
        for i in range(len(parts)):
            if "/".join(parts[i:]) in keys:
                return "/".join(parts[:i])
    return None


def prepare_fgvc(dataset: str, sources: str | Iterable[str], splits: str = DEFAULT_FGVC_SPLITS, out="data/fgvc",
                 workers: int | None = None, expect: Mapping | None = None) -> dict:
    """One FGVC dataset from its original archive(s) and VPT's split files, laid out as VPT reads it
    (``out/<dataset>/{train,val,test}.json`` and its image folder) and verified. Returns the manifest."""
    name = fgvc_dataset_name(dataset)
    with claimed(out, "fgvc") as out:
        _refuse_foreign(out, name)
        if name in prepared_tasks(out):
            _say(f"{name}: already prepared in {out}, kept")
        else:
            _prepare_fgvc_dataset(name, [sources] if isinstance(sources, str) else list(sources), splits, out,
                                  workers or default_workers(), expect)
        return write_manifest(out, "fgvc", FGVC_DATASETS)


def _prepare_fgvc_dataset(name: str, sources: list[str], splits: str, out: Path, workers: int, expect) -> None:
    staging = _staging(out, name)
    split_source = fetch(splits)
    archive, folder = locate_split_files(open_archives(split_source.path), name)
    prefix = "" if folder == "." else folder + "/"
    archive.extract({f"{prefix}{s}.json": staging / f"{s}.json" for s in FGVC_SPLITS}, "split files")
    keys = set()
    for split in FGVC_SPLITS:
        keys |= _split_keys(staging / f"{split}.json", f"{split_source.source}: {prefix}{split}.json")
    splits_only, _ = check_fgvc_splits(staging, name, expect)
    if not splits_only.ok:  # before extracting any image: split files that disagree are not worth the wait
        _fail_fgvc(out, name, splits_only, staging)
    fetched = [fetch(s) for s in sources]
    _extract_fgvc_images(fetched, keys, staging / FGVC_DATASETS[name][1], name)
    report = check_fgvc_dataset(staging, name, expect, workers)
    if not report.ok:
        _fail_fgvc(out, name, report, staging)
    revisions = [f.revision for f in fetched if f.revision]
    _put_in_place(staging, out, report, " + ".join(f.source for f in fetched), " + ".join(revisions) or None,
                  {"splits": split_source.source, "splits_revision": split_source.revision})
    _say(f"{name}: verified ({_counts_text(report)}; {'/'.join(report.formats)}) -> {out / name}")


def _fail_fgvc(out: Path, name: str, report: TaskReport, staging: Path) -> None:
    write_manifest(out, "fgvc", FGVC_DATASETS, {name: "; ".join(map(str, report.problems))})
    raise DataError(f"{name} failed verification, not put in place (files left in {staging}):\n  "
                    + "\n  ".join(map(str, report.problems)))


def _split_keys(path: Path, where: str) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected VPT's format, an object mapping image paths to class ids")
    return set(data)


def _extract_fgvc_images(fetched: list[Fetched], keys: set[str], image_root: Path, dataset: str) -> None:
    placed = 0
    for source in fetched:
        for archive in open_archives(source.path):
            names = archive.names()
            prefix = image_prefix(names, keys)
            if prefix is None:
                continue
            start = len(prefix) + 1 if prefix else 0
            wanted = {n: safe_destination(image_root, n[start:]) for n in names
                      if n.startswith(prefix) and n[start:] in keys}
            archive.extract(wanted, f"extracting {archive.path.name}")
            placed += len(wanted)
    if not placed:
        example = min(keys)
        raise DataError(f"none of the images of {dataset}'s split files is in {', '.join(f.source for f in fetched)} "
                        f"(looked for e.g. {example!r}); pass --from the dataset's original archive")
