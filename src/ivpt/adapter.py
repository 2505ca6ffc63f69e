"""Adapters: only the tuned tensors (``adapter.safetensors``) plus ``adapter_config.json``.

Written atomically (temporary file, then rename); read with safetensors and JSON only, so loading
an adapter never executes code. The config records a sha256 of the tensor file, so a truncated or
altered file is caught before it is used.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import backbone_signature, weights_fingerprint
from .engine.checkpoint import atomic_write
from .data.paths import sha256_file
from .encoder import PromptedViT
from .options import OptionError

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "ivpt-adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter folder is missing, damaged, or does not fit the backbone it is loaded onto."""


def adapter_config(model: PromptedViT) -> dict[str, Any]:
    from . import __version__

    vit = model.backbone
    pcfg = getattr(vit, "pretrained_cfg", None) or {}
    options = dataclasses.asdict(model.method.config)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ivpt_version": __version__,
        "task": "classification",
        "method": model.method_name,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "num_classes": vit.num_classes,
        "class_names": model.class_names,
        "backbone": {
            "name": model.backbone_name,
            "timm_kwargs": getattr(model, "timm_kwargs", {}),
            "weights_source": getattr(model, "weights_source", "module"),  # pretrained | file | none | module
            "weights_file": getattr(model, "weights_file", None),
            "signature": backbone_signature(vit),
            "weights_fingerprint": None if model.method.tunes_backbone else weights_fingerprint(vit),
        },
        "image_size": list(vit.patch_embed.img_size) if vit.patch_embed.img_size else None,
        "dynamic_img_size": bool(getattr(vit, "dynamic_img_size", False)),
        "mean": list(pcfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pcfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": pcfg.get("interpolation", "bicubic"),
    }


def save_adapter(model: PromptedViT, directory, **extra) -> Path:
    """Write the tuned tensors and the config; ``extra`` keys are added to the config (e.g. metrics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.adapter_tensors().items()}
    config = model.adapter_config()  # classification or segmentation model
    config.update(extra)
    config["tensors"] = {n: list(t.shape) for n, t in tensors.items()}
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    config["tensors_sha256"] = sha256_file(directory / TENSORS_FILE)
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return directory


REQUIRED_FIELDS = ("format", "method", "options", "num_classes", "backbone", "tensors", "tensors_sha256")


def read_adapter_config(directory) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path} (expected {CONFIG_FILE} beside {TENSORS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise AdapterError(f"{path}: missing field(s) {', '.join(missing)}")
    if config["format"] != FORMAT:
        raise AdapterError(f"{path}: field 'format' is {config['format']!r}, expected {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {config['format_version']} is newer than this ivpt reads ({FORMAT_VERSION})")
    return config


def read_adapter_tensors(directory, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(directory) / TENSORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter tensors at {path}")
    digest = sha256_file(path)
    if digest != config["tensors_sha256"]:
        raise AdapterError(
            f"{path} does not match its config (sha256 {digest[:12]}…, config says "
            f"{str(config['tensors_sha256'])[:12]}…): the file is truncated, altered or from another adapter"
        )
    try:
        return load_file(str(path))
    except Exception as err:
        raise AdapterError(f"{path} is not a readable safetensors file: {err}") from err


def check_backbone_matches(config: dict[str, Any], model: PromptedViT, source: str) -> None:
    saved = config["backbone"]
    problems = []
    name, recorded = model.backbone_name, saved.get("name")
    if recorded and name:
        (arch_a, _, tag_a), (arch_b, _, tag_b) = recorded.partition("."), name.partition(".")
        if arch_a != arch_b or (tag_a and tag_b and tag_a != tag_b):  # a missing tag matches any
            problems.append(f"name: adapter {recorded!r}, backbone {name!r}")
    now = backbone_signature(model.backbone)
    for key, value in (saved.get("signature") or {}).items():
        if now.get(key) != value:
            problems.append(f"{key}: adapter {value!r}, backbone {now.get(key)!r}")
    fingerprint = saved.get("weights_fingerprint")
    if not problems and fingerprint and not model.method.tunes_backbone:
        current = weights_fingerprint(model.backbone)
        if current is not None and current != fingerprint:
            source = saved.get("weights_file") or saved.get("weights_source", "unknown")
            problems.append(f"weights: the backbone's weights differ from those the adapter was trained on ({source}); "
                            "pass the same ones (weights=PATH or pretrained=True), or check_weights=False")
    if problems:
        raise AdapterError(f"adapter {source} does not fit this backbone: " + "; ".join(problems))


def _pup_stages(config: dict, tensors: dict) -> int | None:
    """Adapters written before decoder_stages was recorded: count SETR-PUP's convolutions in the tensors."""
    if config.get("decoder") != "pup":
        return None
    return sum(1 for name, t in tensors.items() if name.startswith("decoder.body.") and t.dim() == 4) or None


def load_adapter(directory, backbone: str | nn.Module | None = None, *, weights=None, pretrained: bool | None = None,
                 check_weights: bool = True) -> PromptedViT:
    """Rebuild the tuned model from an adapter folder on ``backbone`` (default: the recorded name).

    Without ``weights``/``pretrained``, a backbone given by name gets the weights the adapter was
    trained on, as recorded: timm's pretrained weights, or the same local file if it still exists.
    """
    from .factory import create_model

    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory, config)
    saved = config["backbone"]
    if backbone is None:
        backbone = saved.get("name")
        if not backbone:
            raise AdapterError(f"adapter {directory} records no backbone name; pass backbone=")
    if isinstance(backbone, str) and weights is None and pretrained is None:
        source, recorded = saved.get("weights_source"), saved.get("weights_file")
        if source == "file" and recorded:
            if not Path(recorded).is_file():
                raise AdapterError(f"adapter {directory} was trained on backbone weights from {recorded}, which is "
                                   "not there now; pass weights=PATH to the same file")
            weights = recorded
        pretrained = source == "pretrained"
    if isinstance(backbone, str):
        timm_kwargs = dict(saved.get("timm_kwargs") or {})
        if config.get("image_size") and saved.get("weights_source") == "module":
            timm_kwargs.setdefault("img_size", config["image_size"])  # built by hand at this size
    else:
        timm_kwargs = None
    try:
        if config.get("task", "classification") == "segmentation":
            from .segmentation import create_segmentation_model

            model = create_segmentation_model(
                backbone, config["method"], config["num_classes"], decoder=config["decoder"],
                crop_size=config["crop_size"], decoder_channels=config.get("decoder_channels", 256), weights=weights,
                decoder_stages=config.get("decoder_stages") or _pup_stages(config, tensors),
                pretrained=bool(pretrained), class_names=config.get("class_names"),
                ignore_index=config.get("ignore_index"), timm_kwargs=timm_kwargs, **config["options"])
        else:
            model = create_model(backbone, config["method"], config["num_classes"], weights=weights,
                                 pretrained=bool(pretrained), class_names=config.get("class_names"),
                                 timm_kwargs=timm_kwargs, **config["options"])
    except OptionError as err:
        raise AdapterError(f"{directory / CONFIG_FILE}: {err}") from err
    encoder = getattr(model, "encoder", model)
    if not check_weights:
        saved = dict(saved, weights_fingerprint=None)
    check_backbone_matches(dict(config, backbone=saved), encoder, str(directory))
    expected = model.adapter_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(p.shape)}"
             for n, p in expected.items() if n in tensors and tensors[n].shape != p.shape]
    if missing or unexpected or wrong:
        raise AdapterError(
            f"adapter {directory}: tensors do not fit method {config['method']!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])
    return model
