"""The adapter file format, on a floor of its own: writing and reading tensors + config, no models.

An adapter folder holds ``adapter.safetensors``, whose metadata carries the config (JSON) and a
sha256 of the tensors' bytes, and ``adapter_config.json``, a readable copy of the same config.
The tensor file is the only thing a save commits: it is written to a temporary name and renamed
over the old one in one atomic step, so at any moment of a kill the folder loads as the old
adapter or as the new one, never as a mix. The JSON copy follows; if a kill falls between the two,
the loader uses the config inside the tensor file and says that the copy is stale.
Adapters of format version 1 (config only in the JSON, with the file's sha256) still load.
Reading uses safetensors and JSON only: loading an adapter never executes code.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .card import CARD_FILE, model_card
from .data.paths import sha256_file
from .engine.checkpoint import atomic_write

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "ivpt-adapter"
FORMAT_VERSION = 2
CONFIG_KEY = "ivpt_adapter_config"   # safetensors metadata: the config as JSON
DIGEST_KEY = "ivpt_tensors_sha256"   # safetensors metadata: sha256 over the tensors' names, dtypes, shapes, bytes
REQUIRED_FIELDS = ("format", "method", "options", "num_classes", "backbone", "tensors")
SEGMENTATION_FIELDS = ("decoder", "crop_size")


class AdapterError(ValueError):
    """An adapter folder is missing, damaged, or does not fit the backbone it is loaded onto."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_adapter(directory, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Commit tensors and config in one atomic rename, then refresh the readable JSON copy."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    config = {**config, "format": FORMAT, "format_version": FORMAT_VERSION,
              "tensors": {n: list(t.shape) for n, t in tensors.items()}}
    metadata = {"format": FORMAT, CONFIG_KEY: json.dumps(config), DIGEST_KEY: tensors_digest(tensors)}
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_config_copy(directory, config)
    write_card(directory, config)
    return directory


def write_config_copy(directory, config: dict[str, Any]) -> Path:
    """The readable adapter_config.json beside the tensor file: its config plus the file's sha256."""
    path = Path(directory) / CONFIG_FILE
    copy = {**config, "tensors_sha256": sha256_file(Path(directory) / TENSORS_FILE)}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(copy, indent=2)))
    return path


def write_card(directory, config: dict[str, Any], protocol: dict[str, Any] | None = None) -> Path:
    """The folder's model card (README.md), from the adapter's own record, replaced atomically."""
    path = Path(directory) / CARD_FILE
    text = model_card(config, protocol)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:
        raise AdapterError(f"{path} is not a readable safetensors file (truncated, altered or not an adapter): "
                           f"{err}") from err


def _checked(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if config.get("task") == "segmentation":
        missing += [f for f in SEGMENTATION_FIELDS if f not in config]
    if missing:
        raise AdapterError(f"{where}: missing field(s) {', '.join(missing)}")
    if config["format"] != FORMAT:
        raise AdapterError(f"{where}: field 'format' is {config['format']!r}, expected {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{where}: format_version {config['format_version']} is newer than this ivpt reads "
                           f"({FORMAT_VERSION})")
    return config


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{where} is not valid JSON: {err}") from err


def read_adapter_config(directory) -> dict[str, Any]:
    """The adapter's config: the one inside the tensor file (format 2), else the JSON (format 1)."""
    directory = Path(directory)
    tensors, copy = directory / TENSORS_FILE, directory / CONFIG_FILE
    if not tensors.is_file() and not copy.is_file():
        raise FileNotFoundError(f"no adapter at {directory}: expected {TENSORS_FILE} and {CONFIG_FILE}")
    if tensors.is_file():
        metadata = _metadata(tensors)
        if CONFIG_KEY in metadata:
            config = _checked(_json(metadata[CONFIG_KEY], f"{tensors} (its config)"), f"{tensors} (its config)")
            if copy.is_file() and _stale(copy, config):
                warnings.warn(f"{copy} differs from the config inside {tensors.name} (a save interrupted between "
                              "the two files?); using the one inside the tensor file", stacklevel=2)
            return config
    if not copy.is_file():
        raise FileNotFoundError(f"no adapter config at {copy} (expected {CONFIG_FILE} beside {TENSORS_FILE})")
    config = _checked(_json(copy.read_text(), str(copy)), str(copy))
    if "tensors_sha256" not in config:
        raise AdapterError(f"{copy}: missing field(s) tensors_sha256")
    if config.get("format_version", 1) >= 2 and tensors.is_file():
        # ivpt writes a format-2 config inside the tensor file: without it, nothing ties this file to the JSON
        raise AdapterError(f"{tensors} carries no ivpt config, though {copy} records format_version "
                           f"{config['format_version']} (whose config lives inside the tensor file): the tensor file "
                           "was replaced or rewritten by another tool; save the adapter again with ivpt")
    return config


def config_file(directory, config: dict[str, Any]) -> Path:
    """The file that ``config`` was read from (for errors about its fields)."""
    return Path(directory) / (TENSORS_FILE if config.get("format_version", 1) >= 2 else CONFIG_FILE)


def _stale(copy: Path, config: dict) -> bool:
    try:
        saved = json.loads(copy.read_text())
    except (OSError, ValueError):
        return True
    saved.pop("tensors_sha256", None)
    return saved != json.loads(json.dumps(config))


def read_adapter_tensors(directory, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(directory) / TENSORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter tensors at {path}")
    if config.get("format_version", 1) < 2:  # format 1: the JSON records the file's sha256
        digest = sha256_file(path)
        if digest != config["tensors_sha256"]:
            raise AdapterError(f"{path} does not match its config (sha256 {digest[:12]}…, config says "
                               f"{str(config['tensors_sha256'])[:12]}…): the file is truncated, altered or from "
                               "another adapter")
    metadata = _metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise AdapterError(f"{path} is not a readable safetensors file (truncated, altered?): {err}") from err
    if DIGEST_KEY in metadata and tensors_digest(tensors) != metadata[DIGEST_KEY]:
        raise AdapterError(f"{path} does not match its config's digest of the tensors: the file is truncated, "
                           "altered or from another adapter")
    return tensors
