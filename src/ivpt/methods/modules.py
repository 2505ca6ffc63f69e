"""The second kind of method: one that changes what the backbone's own modules compute.

Prompt methods add tokens between timm's blocks (``ivpt.encoder`` runs the loop). Module methods
(LoRA, bottleneck adapters, SSF, BitFit) leave the token sequence alone and act inside the blocks.
They follow three rules (docs/method.md, "Methods that change the backbone's modules"):

- **Where**: a method reaches timm's modules by attribute (``block.attn.qkv``, ``block.mlp``,
  ``block.norm1``, ``vit.patch_embed.proj``...), never by matching parameter names; a backbone
  without the module it needs gets an error naming the block and the attribute.
- **How**: a new tensor (LoRA's A and B, an adapter's MLP, SSF's scale and shift) lives in a small
  module owned by the method; a forward hook on the timm module adds its effect to that module's
  output. The backbone's module tree, parameter names and state dict stay timm's own, so timm
  checkpoints still load and a merged export is a plain timm checkpoint. A method may instead tune
  some of the backbone's own tensors in place (BitFit's biases), chosen by module type.
- **What is saved**: exactly the method's tensors (and the head), like every adapter.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import TuningMethod


class AttachError(ValueError):
    """The backbone lacks a module a method needs (names the block and the attribute)."""


def submodule(root: nn.Module, path: str, kind: type | tuple[type, ...], method: str, where: str) -> nn.Module:
    """``root.<path>`` as a ``kind`` instance, or a clear AttachError."""
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            break
    if not isinstance(module, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        found = "nothing" if module is None else type(module).__name__
        raise AttachError(f"method {method!r} cannot attach to this backbone: {where}.{path} is {found}, expected "
                          f"{' or '.join(k.__name__ for k in kinds)} (a timm VisionTransformer block)")
    return module


class ModuleMethod(TuningMethod):
    """Base of the methods that act inside the blocks; subclasses build their modules in ``attach``."""

    mergeable = False

    def __init__(self, config, shape):
        super().__init__(config, shape)
        self._attached = False

    def attach(self, vit: nn.Module) -> None:
        if self._attached:
            raise RuntimeError(f"method {self.name!r} is already attached to a backbone")
        self._attached = True
        self.build(vit)

    def build(self, vit: nn.Module) -> None:
        raise NotImplementedError

    def hook(self, module: nn.Module, fn) -> None:
        """Add ``fn(module, args, output) -> output`` after ``module``; a bound method of an owned module,
        so that ``copy.deepcopy`` of the whole model copies the hook onto the copied tensors."""
        self._handles.append(module.register_forward_hook(fn))


def blocks_of(vit: nn.Module, method: str) -> list[nn.Module]:
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise AttachError(f"method {method!r} cannot attach to this backbone: it has no blocks (a timm "
                          "VisionTransformer's nn.Sequential of Block modules)")
    return list(blocks)


def strip_hooks(model: nn.Module, ids: set[int]) -> None:
    """Remove the forward hooks with these ids from every module of ``model`` (a copy's hooks keep their ids)."""
    for module in model.modules():
        for hook_id in ids & set(module._forward_hooks):
            del module._forward_hooks[hook_id]
            module._forward_hooks_with_kwargs.pop(hook_id, None)
            module._forward_hooks_always_called.pop(hook_id, None)


def module_name(vit: nn.Module, target: nn.Module) -> str:
    for name, module in vit.named_modules():
        if module is target:
            return name
    raise KeyError("module not in the backbone")


@torch.no_grad()
def fold_scale_shift(state: dict[str, torch.Tensor], prefix: str, scale: torch.Tensor, shift: torch.Tensor,
                     method: str) -> None:
    """y = scale * (W x + b) + shift folded into the layer whose weight and bias are ``prefix.weight/.bias``:
    W <- scale W (per output channel), b <- scale b + shift."""
    weight, bias_key = state.get(f"{prefix}.weight"), f"{prefix}.bias"
    if weight is None or bias_key not in state:
        raise ValueError(f"method {method!r} cannot be merged into this backbone: {prefix} has no "
                         f"{'weight' if weight is None else 'bias'} to take the {'scale' if weight is None else 'shift'}")
    view = (-1,) + (1,) * (weight.dim() - 1)
    state[f"{prefix}.weight"] = weight * scale.to(weight.dtype).view(view)
    state[bias_key] = state[bias_key] * scale.to(weight.dtype) + shift.to(weight.dtype)
