"""SSF (Lian et al., NeurIPS 2022): a learned per-channel scale and shift after the backbone's layers.

y' = gamma * y + beta after the patch embedding's projection, after each block's norm1, attn.qkv,
attn.proj, norm2, mlp.fc1 and mlp.fc2, and after the final norm (the places of SSF's own timm
code; under average pooling timm's final norm is ``fc_norm``, after the pooling, and the site follows it
so that it still folds into a norm's affine). gamma ~ N(1, std), beta ~ N(0, std) with std = ``ssf_init_std`` (SSF's 0.02); std 0 starts
from the pretrained model exactly. Every site follows a linear map or a norm's affine, so the
change folds into those weights: W <- gamma W, b <- gamma b + beta (``ivpt export --merged``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..options import check_float
from .modules import ModuleMethod, blocks_of, fold_scale_shift, module_name, submodule

BLOCK_SITES = (("norm1", nn.LayerNorm), ("attn.qkv", nn.Linear), ("attn.proj", nn.Linear),
               ("norm2", nn.LayerNorm), ("mlp.fc1", nn.Linear), ("mlp.fc2", nn.Linear))


@dataclass(frozen=True)
class SSFConfig:
    ssf_init_std: float = 0.02

    def __post_init__(self):
        check_float("ssf_init_std", self.ssf_init_std, 0.0)


class ScaleShift(nn.Module):
    def __init__(self, channels: int, std: float, channel_dim: int, device):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, device=device))
        self.shift = nn.Parameter(torch.zeros(channels, device=device))
        if std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=std)
            nn.init.normal_(self.shift, std=std)
        self.channel_dim = channel_dim  # -1 for tokens (B, N, C); 1 for the patch projection's (B, C, H, W)

    def apply_to(self, module, args, out):
        scale, shift = self.scale.to(out.dtype), self.shift.to(out.dtype)
        if self.channel_dim == 1:
            scale, shift = scale[:, None, None], shift[:, None, None]
        return out * scale + shift


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.normalized_shape[-1]


class SSF(ModuleMethod):
    name = "ssf"
    config_class = SSFConfig
    mergeable = True

    def build(self, vit):
        std = self.config.ssf_init_std
        sites = [submodule(vit, "patch_embed.proj", nn.Conv2d, self.name, "backbone")]
        for i, block in enumerate(blocks_of(vit, self.name)):
            sites += [submodule(block, path, kind, self.name, f"blocks[{i}]") for path, kind in BLOCK_SITES]
        # the final norm: timm's `norm`, or under global_pool="avg" its `fc_norm` (then `norm` is an Identity)
        final = [m for m in (getattr(vit, "norm", None), getattr(vit, "fc_norm", None)) if isinstance(m, nn.LayerNorm)]
        sites += final[:1]
        self.scale_shifts = nn.ModuleList()
        self._sites: list[nn.Module] = []
        for module in sites:
            ss = ScaleShift(_channels(module), std, 1 if isinstance(module, nn.Conv2d) else -1, module.weight.device)
            self.scale_shifts.append(ss)
            self._sites.append(module)
            self.hook(module, ss.apply_to)

    def parameter_groups(self):
        return {"ssf": list(self.scale_shifts.parameters())}

    @torch.no_grad()
    def merged_state(self, vit):
        state = dict(vit.state_dict())
        for ss, module in zip(self.scale_shifts, self._sites):
            fold_scale_shift(state, module_name(vit, module), ss.scale, ss.shift, self.name)
        return state
