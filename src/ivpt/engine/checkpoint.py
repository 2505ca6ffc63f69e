"""Training checkpoints as safetensors + JSON, written atomically, read without unpickling.

A checkpoint holds the given model tensors, the optimizer's state (tensors in safetensors, scalars
in JSON) and any JSON-serialisable ``meta`` (epoch, log, config). Each save writes a new tensor file
(``checkpoint-<n>.safetensors``), then atomically replaces ``checkpoint.json``, which names that
file and records its sha256, and only then deletes the previous tensor file. Whenever the process
stops, ``checkpoint.json`` names a complete pair: the new one or the previous one.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.paths import absolute_path, sha256_file

META = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model or optimizer it is loaded into."""


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over ``path``: readers see the old file or the new one.

    Temporaries that a killed process left for the same file are removed first (never a live one's).
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale_temporaries(path: Path) -> None:
    """This host's temporaries of ``path`` whose process is gone (other hosts' are theirs to judge)."""
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{path.name}.tmp-{_HOST}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, scalars


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[name] = value
    for key, value in scalars.items():
        idx, name = key.split(".", 1)
        state["state"].setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"optimizer state in the checkpoint does not fit: {err}") from err


def save_checkpoint(directory, model_tensors: dict[str, torch.Tensor], optimizer, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model_tensors.items()}
    opt_tensors, opt_scalars = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    previous = _tensor_file(directory)
    serial = int(previous.stem.rsplit("-", 1)[-1]) + 1 if previous is not None else 1
    name = f"checkpoint-{serial}.safetensors"
    atomic_write(directory / name, lambda tmp: save_file(tensors, str(tmp)))
    record = dict(meta, optimizer_scalars=opt_scalars, tensors_file=name, tensors_sha256=sha256_file(directory / name))
    atomic_write(directory / META, lambda tmp: tmp.write_text(json.dumps(record)))
    if previous is not None and previous.name != name and previous.exists():
        previous.unlink()  # only once the JSON names the new pair


def _tensor_file(directory: Path) -> Path | None:
    """The tensor file the current checkpoint.json names, if any."""
    try:
        name = json.loads((directory / META).read_text()).get("tensors_file")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return directory / name if name else None


def has_checkpoint(directory) -> bool:
    return (Path(directory) / META).is_file()


def checkpoint_meta(directory) -> dict[str, Any]:
    """The JSON half of a checkpoint (epoch, log, config), without reading the tensors."""
    path = Path(directory) / META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_checkpoint(directory, optimizer=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, meta); restores the optimizer in place when one is given."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (expected {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or not meta.get("tensors_file"):
        raise CheckpointError(f"{meta_path} does not name its tensor file (field 'tensors_file')")
    tensor_path = directory / meta["tensors_file"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}, named by {meta_path}, is missing")
    if sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensor_path} does not match {meta_path} (truncated, altered or from another save)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file: {err}") from err
    if optimizer is not None:
        restore_optimizer(optimizer, tensors, meta.get("optimizer_scalars", {}))
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, meta


def set_aside_run(directory) -> Path | None:
    """Move a run folder's files out of the way so that a run can start over there (``--restart``):
    renamed to ``NAME.replaced-<time>`` beside it, nothing deleted. None when there is nothing to move.
    Refused while another process holds the folder."""
    import time

    from .runlock import RunLock

    directory = Path(absolute_path(directory))
    if not (has_checkpoint(directory) or (directory / "results.json").is_file()):
        return None  # no run there (a typo'd --output must never move a folder of something else)
    with RunLock(directory):  # RunLockedError, naming the holder, when a live run writes there
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = directory.with_name(f"{directory.name}.replaced-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = directory.with_name(f"{directory.name}.replaced-{stamp}-{n}")
        os.replace(directory, target)
    return target
