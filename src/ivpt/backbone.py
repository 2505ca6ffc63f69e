"""Building and checking the timm Vision Transformer that ivpt tunes.

ivpt never copies timm's ViT: it takes timm's own ``VisionTransformer`` (by name through
``timm.create_model`` or already built) and refuses anything whose blocks it cannot drive safely.
"""
from __future__ import annotations

import difflib
import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from .backbones import is_shipped, shipped_files
from .methods.base import BackboneShape

# pre-norm blocks only: DA mixes in standardised space because norm1 sees only each token's direction
SUPPORTED_BLOCKS = (Block,)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class BackboneError(ValueError):
    """The backbone is unknown, unsupported, or its weights cannot be used."""


@dataclass(frozen=True)
class BackboneOrigin:
    """How a model's backbone was built, as its adapter records it so that it can be rebuilt alike."""

    weights_source: str = "module"  # pretrained | file | none | module (a built timm model was passed in)
    weights_file: str | None = None  # the absolute path, for weights_source "file"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model's extra arguments
    pooling_modules: bool = True  # timm's pooling modules kept (a dense encoder drops them)


def check_supported(vit: nn.Module) -> VisionTransformer:
    """Refuse, with a reason, every model the prompted encoder could mis-handle."""
    if not isinstance(vit, VisionTransformer):
        raise BackboneError(
            f"ivpt tunes timm VisionTransformer models; got {type(vit).__module__}.{type(vit).__name__}"
        )
    if not isinstance(vit.blocks, nn.Sequential) or len(vit.blocks) == 0:
        raise BackboneError("backbone has no transformer blocks to prompt")
    for i, block in enumerate(vit.blocks):
        if type(block) not in SUPPORTED_BLOCKS:
            raise BackboneError(
                f"block {i} is {type(block).__name__}; ivpt supports timm's "
                f"{', '.join(b.__name__ for b in SUPPORTED_BLOCKS)} (pre-norm ViT blocks)"
            )
        attn = block.attn
        if type(attn) is not Attention or not isinstance(attn.qkv, nn.Linear):
            raise BackboneError(
                f"block {i} uses {type(attn).__name__}; ivpt needs timm's Attention with a fused qkv "
                "projection (AR reads its query and key rows from it)"
            )
    return vit


def backbone_shape(vit: VisionTransformer) -> BackboneShape:
    return BackboneShape(
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=vit.blocks[0].attn.num_heads,
        patch_size=tuple(vit.patch_embed.patch_size),
        num_prefix_tokens=vit.num_prefix_tokens,
        has_class_token=vit.cls_token is not None,
    )


def input_config(vit: VisionTransformer) -> dict[str, Any]:
    """The backbone's timm pretrained config with the input size it was built at.

    timm keeps ``input_size`` from the pretrained config when ``img_size`` is passed as a model
    option; the data pipeline must feed the size the patch embedding was built for.
    """
    cfg = dict(vit.pretrained_cfg or {})
    img_size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    if img_size:
        channels = (cfg.get("input_size") or (3,))[0]
        cfg["input_size"] = (channels, *tuple(img_size))
    return cfg


def backbone_name(vit: VisionTransformer) -> str | None:
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return None
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


def backbone_signature(vit: VisionTransformer) -> dict[str, Any]:
    """What an adapter depends on; compared field by field when an adapter is loaded."""
    shape = backbone_shape(vit)
    return {
        "embed_dim": shape.embed_dim,
        "depth": shape.depth,
        "num_heads": shape.num_heads,
        "patch_size": list(shape.patch_size),
        "num_prefix_tokens": shape.num_prefix_tokens,
        "class_token": shape.has_class_token,
        "global_pool": vit.global_pool,
    }


def weights_fingerprint(vit: VisionTransformer) -> str | None:
    """sha256 of the patch embedding and position embedding: tells pretrained weights apart cheaply."""
    tensors = [vit.patch_embed.proj.weight]
    if vit.pos_embed is not None:
        tensors.append(vit.pos_embed)
    if any(t.is_meta for t in tensors):
        return None
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def frozen_weights_digest(vit: nn.Module, tuned: set[int]) -> str | None:
    """sha256 of every backbone tensor but the ``tuned`` ones (by id): names, shapes and values.

    What an adapter needs to find again on reload: a checkpoint differing only inside the blocks (or one
    whose patch projection and position embedding stayed fixed, as MoCo v3's do) gives another digest.
    """
    items = sorted((name, t) for name, t in vit.state_dict(keep_vars=True).items() if id(t) not in tuned)
    if any(t.is_meta for _, t in items):
        return None
    digest = hashlib.sha256()
    for name, t in items:
        digest.update(f"{name}:{list(t.shape)}\n".encode())
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _refused_object(err: Exception) -> str:
    """What the unpickler refused, without PyTorch's advice to re-run with the protection off."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"the global {found.group(1)}" if found else "an object that is not a tensor"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: never execute pickled code from a checkpoint
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # PyTorch's own advice here would be to turn the protection off
        raise BackboneError(
            f"refused to load weights file {path}: it pickles {_refused_object(err)}, and unpickling "
            "objects other than tensors could run code from the file. Use a .safetensors file; if the file comes from a source "
            "you trust, convert it once in a throwaway environment (torch.load it there and write its state dict "
            "with safetensors.torch.save_file), then pass the .safetensors file"
        ) from None
    except Exception as err:
        raise BackboneError(f"cannot read weights file {path}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load local weights: timm/PyTorch state dicts (.safetensors, .pth, .bin) or Google .npz."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {path}: unknown format {suffix!r}, expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if suffix == ".npz":
        head = {k: v.clone() for k, v in vit.get_classifier().state_dict().items()}
        try:
            vit.load_pretrained(str(path))  # timm's converter for Google's original ViT checkpoints
        except Exception as err:
            raise BackboneError(f"cannot load Google ViT checkpoint {path}: {err}") from err
        vit.get_classifier().load_state_dict(head)  # keep the new task's head
        return
    state = checkpoint_filter_fn(_read_state_dict(path), vit)  # e.g. resamples pos_embed to img_size
    own = vit.state_dict()
    head = {n for n, _ in vit.get_classifier().named_parameters(prefix="head")}
    for name in list(state):
        if name.startswith("head."):
            del state[name]  # the pretraining task's classifier: the new task keeps its fresh head
    mismatched = [f"{n}: file {tuple(state[n].shape)} vs model {tuple(own[n].shape)}"
                  for n in state if n in own and state[n].shape != own[n].shape]
    if mismatched:
        raise BackboneError(f"weights file {path} does not fit this backbone: " + "; ".join(mismatched[:5]))
    result = vit.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights file {path} does not match the backbone: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


OWNER_ATTRIBUTE = "_ivpt_owner"  # set on a backbone module by the ivpt model built around it


def check_unowned(vit: nn.Module) -> None:
    """A backbone module serves one ivpt model: a second would replace the first's head and, for module
    methods, hook a second set of changes into the modules both models run."""
    owner = vit.__dict__.get(OWNER_ATTRIBUTE)
    if owner is not None:
        raise BackboneError(f"this backbone module already belongs to an ivpt model (method {owner!r}); a second "
                            "model on it would change the first one too. Build a fresh one with timm.create_model "
                            "(a copy.deepcopy of it carries the first model's method along)")


HUB_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def offline_pretrained_file(backbone: str) -> str | None:
    """Where timm's pretrained weights for ``backbone`` lie in a local cache when their server cannot be
    reached (None: the server answers, so timm downloads or reads its cache as usual). Unreachable and not
    cached: a BackboneError at once, instead of huggingface_hub's minute of retries."""
    from .reach import hub_unreachable, unreachable

    advice = "pass weights='path/to/file' (.safetensors, .pth/.bin state dict, or Google .npz)"
    if backbone.startswith("hf-hub:"):
        reason = hub_unreachable()
        if not reason:
            return None
        from huggingface_hub import try_to_load_from_cache

        repo = backbone[len("hf-hub:"):].partition("@")[0]
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):  # timm reads it from the cache, slowly
            warnings.warn(f"backbone {backbone!r}: the Hugging Face Hub cannot be reached ({reason}); reading the "
                          "repository from the Hub cache after huggingface_hub's retries (about a minute; "
                          "HF_HUB_OFFLINE=1 skips them)", stacklevel=3)
            return None
        raise BackboneError(f"backbone {backbone!r}: the Hugging Face Hub cannot be reached ({reason}) and the "
                            f"repository is not in the Hub cache; {advice}")
    cfg = timm.models.get_pretrained_cfg(backbone, allow_unregistered=True)
    if cfg is None:
        return None  # no pretrained source known to timm: its own error says so
    if cfg.hf_hub_id:
        reason = hub_unreachable()
        if not reason:
            return None
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        for name in names:
            cached = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(cached, str):
                return cached
        where = f"the Hugging Face Hub ({repo})"
    elif cfg.url:
        reason = unreachable(cfg.url)
        if not reason:
            return None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name  # where timm caches URL downloads
        if cached.is_file():
            return str(cached)
        where = cfg.url
    else:
        return None
    raise BackboneError(f"could not fetch pretrained weights for {backbone!r}: they come from {where}, which this "
                        f"machine cannot reach ({reason}), and they are not in the local cache. Offline? {advice}")


def build_backbone(backbone: str | nn.Module, num_classes: int, *, pretrained: bool = False,
                   weights: str | Path | None = None, **timm_kwargs) -> VisionTransformer:
    """A supported timm ViT with a fresh head for ``num_classes``, weights loaded as asked."""
    if isinstance(backbone, nn.Module):
        if pretrained or timm_kwargs:
            raise BackboneError("pretrained= and timm options apply to backbone names, not to a built model")
        vit = check_supported(backbone)
        check_unowned(vit)  # before reset_classifier, which would replace the owner's head
        vit.reset_classifier(num_classes)
        if weights is not None:
            load_backbone_weights(vit, weights)
        return vit
    if not isinstance(backbone, str):
        raise BackboneError(f"backbone must be a timm model name or a VisionTransformer, got {type(backbone).__name__}")
    if is_shipped(backbone) and weights is None:
        pretrained = True  # shipped inside the package: loads offline, no argument needed
        weights_file, _ = shipped_files(backbone)
        if not weights_file.is_file():
            raise BackboneError(f"the weights of {backbone!r} are missing from the package ({weights_file}); "
                                "reinstall ivpt or run python -m ivpt.backbones.pretrain")
    arch = backbone.split(".", 1)[0]
    if backbone.startswith("hf-hub:"):  # timm's own Hub loading (its config.json names the architecture)
        if not pretrained and weights is None:
            raise BackboneError(f"backbone {backbone!r} is a Hub repository: pass pretrained=True (its weights) or "
                                "weights=FILE")
    elif not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=5)
        raise BackboneError(f"unknown backbone {backbone!r}" + (f"; similar timm models: {', '.join(close)}" if close else ""))
    if pretrained and weights is None and not is_shipped(backbone):
        overlay = offline_pretrained_file(backbone)  # unreachable and not cached: said now, not after a minute
        if overlay:
            timm_kwargs = {**timm_kwargs, "pretrained_cfg_overlay": {**timm_kwargs.get("pretrained_cfg_overlay", {}),
                                                                     "file": overlay}}
    try:
        vit = timm.create_model(backbone, pretrained=pretrained and weights is None, num_classes=num_classes, **timm_kwargs)
    except (OSError, ConnectionError, RuntimeError) as err:
        if pretrained and weights is None:
            raise BackboneError(
                f"could not fetch pretrained weights for {backbone!r} ({type(err).__name__}: {err}). "
                "Offline? Pass weights='path/to/file' (.safetensors, .pth/.bin state dict, or Google .npz)"
                + ("; a Hub repository already in the Hub cache loads with HF_HUB_OFFLINE=1"
                   if backbone.startswith("hf-hub:") else "")
            ) from err
        raise
    except TypeError as err:  # e.g. a misspelt timm option: "__init__() got an unexpected keyword argument 'embd_dim'"
        given = ", ".join(map(repr, timm_kwargs)) or "none"
        raise BackboneError(f"timm.create_model({backbone!r}) refused its options (timm_kwargs / backbone_options: "
                            f"{given}): {err}") from err
    check_supported(vit)
    if pretrained and weights is None:
        vit.reset_classifier(num_classes)  # a fresh head for the new task, whatever timm kept
    if weights is not None:
        load_backbone_weights(vit, weights)
    return vit
