"""Loading adapters: a model rebuilt from an adapter folder, checked against its backbone.

This module sits above both the file format (``ivpt.adapter_format``: tensors + config, no models)
and the code that builds models (``ivpt.factory``, ``ivpt.segmentation``); nothing below imports it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import (CONFIG_FILE, FORMAT, FORMAT_VERSION, TENSORS_FILE, AdapterError, read_adapter_config,
                             config_file, read_adapter_tensors, write_adapter)
from .backbone import backbone_signature, weights_fingerprint
from .encoder import PromptedViT
from .factory import create_model
from .options import OptionError
from .segmentation import create_segmentation_model

__all__ = ["AdapterError", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "adapter_config",
           "check_backbone_matches", "load_adapter", "read_adapter_config", "read_adapter_tensors", "save_adapter",
           "write_adapter"]


def adapter_config(model) -> dict[str, Any]:
    """The config an adapter of ``model`` records (classification or segmentation)."""
    return model.adapter_config()


def save_adapter(model, directory, **extra) -> Path:
    """Write ``model``'s tuned tensors and config; ``extra`` keys are added to the config (e.g. metrics)."""
    model.save_adapter(directory, **extra)
    return Path(directory)


def check_backbone_matches(config: dict[str, Any], model: PromptedViT, source: str) -> None:
    saved = config["backbone"]
    problems = []
    name, recorded = model.backbone_name, saved.get("name")
    if recorded and name and not same_backbone_name(recorded, name):
        problems.append(f"name: adapter {recorded!r}, backbone {name!r}")
    now = backbone_signature(model.backbone)
    for key, value in (saved.get("signature") or {}).items():
        if now.get(key) != value:
            problems.append(f"{key}: adapter {value!r}, backbone {now.get(key)!r}")
    # every frozen tensor where the adapter recorded their digest; older adapters: patch and position embeddings
    full, fingerprint = saved.get("frozen_weights_sha256"), saved.get("weights_fingerprint")
    if not problems and (full or fingerprint) and not model.method.tunes_backbone:
        current = model.frozen_weights_sha256() if full else weights_fingerprint(model.backbone)
        if current is not None and current != (full or fingerprint):
            trained_on = saved.get("weights_file") or saved.get("weights_source", "unknown")
            problems.append(f"weights: the backbone's weights differ from those the adapter was trained on ({trained_on}); "
                            "pass the same ones (--weights PATH on the command line; weights=PATH or pretrained=True "
                            "in Python), or check_weights=False in Python to use these anyway")
    if problems:
        raise AdapterError(f"adapter {source} does not fit this backbone: " + "; ".join(problems))


def same_backbone_name(recorded: str, name: str) -> bool:
    """Whether two timm names are one backbone: the same architecture, and the same tag where both have one."""
    (arch_a, _, tag_a), (arch_b, _, tag_b) = recorded.partition("."), name.partition(".")
    return arch_a == arch_b and not (tag_a and tag_b and tag_a != tag_b)  # a missing tag matches any


def _pup_stages(config: dict, tensors: dict) -> int | None:
    """Adapters written before decoder_stages was recorded: count SETR-PUP's convolutions in the tensors."""
    if config.get("decoder") != "pup":
        return None
    return sum(1 for name, t in tensors.items() if name.startswith("decoder.body.") and t.dim() == 4) or None


def load_adapter(directory, backbone: str | nn.Module | None = None, *, weights=None, pretrained: bool | None = None,
                 check_weights: bool = True) -> PromptedViT:
    """Rebuild the tuned model from an adapter folder (or ``hf-hub:org/name[@revision]``) on ``backbone``
    (default: the recorded name).

    Without ``weights``/``pretrained``, a backbone given by name gets the weights the adapter was
    trained on, as recorded: timm's pretrained weights, or the same local file if it still exists.
    """
    from .hub import resolve_adapter

    directory = resolve_adapter(directory)  # a folder, or hf-hub:org/name[@revision] through the Hub cache
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory, config)
    saved = config["backbone"]
    if backbone is None:
        backbone = saved.get("name")
        if not backbone:
            raise AdapterError(f"adapter {directory} records no backbone name; pass backbone=")
    if isinstance(backbone, str) and saved.get("name") and not same_backbone_name(saved["name"], backbone):
        # said before anything is built: building it could mean downloading weights for nothing
        raise AdapterError(f"adapter {directory} does not fit this backbone: name: adapter {saved['name']!r}, "
                           f"backbone {backbone!r}; leave backbone= out to use the recorded one")
    seed = None  # a backbone trained from random weights is rebuilt from the run's seed, as the run built it
    if isinstance(backbone, str) and weights is None and pretrained is None:
        source, recorded = saved.get("weights_source"), saved.get("weights_file")
        if source == "none":
            seed = (config.get("training_config") or {}).get("seed")
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
        if seed is None:
            model = _build(config, tensors, backbone, weights, pretrained, timm_kwargs)
        else:  # built as the run built it: one class under its seed, then the task's head under seed + 1
            with _seeded(seed):
                model = _build({**config, "num_classes": 1, "class_names": None}, tensors, backbone, weights,
                               pretrained, timm_kwargs)
            with _seeded(seed + 1):
                if config.get("task", "classification") == "segmentation":
                    model.reset_decoder(config["num_classes"], config.get("class_names"), config.get("ignore_index"))
                else:
                    model.reset_classifier(config["num_classes"], config.get("class_names"))
    except OptionError as err:
        raise AdapterError(f"{config_file(directory, config)}: {err}") from err
    encoder = getattr(model, "encoder", model)
    if not check_weights:
        saved = dict(saved, weights_fingerprint=None, frozen_weights_sha256=None)
    try:
        _fill(model, encoder, config, saved, tensors, directory)
    except Exception:
        encoder.release_backbone()  # a module the caller passed in is theirs again, to retry with
        raise
    model.recorded = {k: config[k] for k in ("data", "segmentation") if config.get(k)}
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's generator seeded for a block, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as the training run seeded it before building the model
        yield


def _build(config: dict, tensors: dict, backbone, weights, pretrained, timm_kwargs):
    """The model an adapter's config describes, before its tensors are filled in."""
    if config.get("task", "classification") == "segmentation":
        return create_segmentation_model(
            backbone, config["method"], config["num_classes"], decoder=config["decoder"],
            crop_size=config["crop_size"], decoder_channels=config.get("decoder_channels", 256), weights=weights,
            decoder_stages=config.get("decoder_stages") or _pup_stages(config, tensors),
            pooling_modules=config.get("pooling_modules", True),  # older adapters: built with them
            pretrained=bool(pretrained), class_names=config.get("class_names"),
            ignore_index=config.get("ignore_index"), timm_kwargs=timm_kwargs, **config["options"])
    return create_model(backbone, config["method"], config["num_classes"], weights=weights,
                        pretrained=bool(pretrained), class_names=config.get("class_names"),
                        timm_kwargs=timm_kwargs, **config["options"])


def _fill(model, encoder, config: dict, saved: dict, tensors: dict, directory) -> None:
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
