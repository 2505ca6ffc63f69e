"""Self-supervised ViT-B/16 checkpoints in their authors' formats, as timm state dicts (``ivpt convert-weights``).

- MoCo v3 (facebookresearch/moco-v3): the pretraining checkpoint (``vit-b-300ep.pth.tar``: ``state_dict`` with
  ``module.base_encoder.*``, ``module.momentum_encoder.*``, ``module.predictor.*``) or the linear-probe one that
  VPT and GateVPT load (``linear-vit-b-300ep.pth.tar``: ``state_dict`` with ``module.*``). Its ViT is a timm
  ``VisionTransformer`` subclass, so the names are timm's once the prefix is gone; the head (the projector, or
  the ImageNet classifier) is dropped. Load the result into ``vit_base_patch16_224``.
- MAE (facebookresearch/mae, ``mae_pretrain_vit_base.pth``: ``model`` with timm's names). For average pooling
  (``global_pool: avg``, which ``pool_prompts`` needs) timm replaces the final ``norm`` by ``fc_norm`` after the
  pooling; VPT's code leaves that fc_norm at its fresh values (weight 1, bias 0), GateVPT's applies the
  checkpoint's ``norm`` there (``norm_after_pool``). Both are written as ``fc_norm``; docs/method.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .backbone import BackboneError, _read_state_dict

FORMATS = ("moco-v3", "mae")
REQUIRED = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight")


def _require_vit(state: dict[str, torch.Tensor], source: str, fmt: str) -> None:
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        seen = ", ".join(sorted(state)[:4])
        raise BackboneError(f"{source} does not look like a {fmt} ViT checkpoint: no {missing[0]!r} after "
                            f"conversion (its first keys: {seen})")


def moco_v3_to_timm(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """MoCo v3's base encoder under timm's names (``module.`` already stripped), its head dropped."""
    encoder = "base_encoder."
    if any(k.startswith(encoder) for k in state):  # the pretraining checkpoint: the momentum encoder is left out
        state = {k[len(encoder):]: v for k, v in state.items() if k.startswith(encoder)}
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    _require_vit(out, source, "MoCo v3")
    return out


def mae_to_timm(state: dict[str, torch.Tensor], source: str = "checkpoint",
                norm_after_pool: bool = False) -> dict[str, torch.Tensor]:
    """MAE's encoder for timm's average pooling: fc_norm fresh (VPT's code) or the checkpoint's norm (GateVPT's)."""
    out = {k: v for k, v in state.items()
           if not k.startswith(("decoder", "mask_token", "head.", "norm.", "fc_norm."))}
    _require_vit(out, source, "MAE")
    if "norm.weight" not in state:
        raise BackboneError(f"{source} has no final norm ('norm.weight'): not an MAE pretraining checkpoint")
    weight, bias = state["norm.weight"], state["norm.bias"]
    if norm_after_pool:
        out["fc_norm.weight"], out["fc_norm.bias"] = weight.clone(), bias.clone()
    else:
        out["fc_norm.weight"], out["fc_norm.bias"] = torch.ones_like(weight), torch.zeros_like(bias)
    return out


def convert_weights(fmt: str, source: str | Path, output: str | Path, *, norm_after_pool: bool = False) -> Path:
    """Read ``source`` (read as tensors only, never unpickling code), convert, write ``output`` (.safetensors)."""
    from safetensors.torch import save_file

    source, output = Path(source).expanduser(), Path(output).expanduser()
    if fmt not in FORMATS:
        raise BackboneError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if output.suffix != ".safetensors":
        raise BackboneError(f"output {output}: expected a .safetensors file name")
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if output.resolve() == source.resolve():
        raise BackboneError(f"output {output} is the checkpoint itself; write the converted weights elsewhere")
    if norm_after_pool and fmt != "mae":
        raise BackboneError("--norm-after-pool applies to MAE checkpoints only")
    state = _read_state_dict(source)  # unwraps 'state_dict' / 'model' and strips DDP's 'module.'
    if fmt == "moco-v3":
        state = moco_v3_to_timm(state, str(source))
    else:
        state = mae_to_timm(state, str(source), norm_after_pool)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output))
    return output
