"""LoRA (Hu et al., ICLR 2022): low-rank updates of chosen linear layers of every block.

h = W x + b + (alpha / r) B A x, with A (r x in) initialised as nn.Linear's weights (Kaiming
uniform, a = sqrt(5), as loralib and peft do) and B (out x r) at zero, so training starts from the
pretrained model exactly. timm fuses q, k and v into one ``attn.qkv`` layer; targets ``q``, ``k``
and ``v`` update its thirds separately (each its own A and B), ``qkv`` updates the fused layer as
one (what peft does when pointed at ``qkv``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..options import OptionError, check_float, check_int
from .modules import ModuleMethod, blocks_of, module_name, submodule

# target -> (module path in a timm Block, which third of the output: None = all of it)
LORA_TARGETS = {"q": ("attn.qkv", 0), "k": ("attn.qkv", 1), "v": ("attn.qkv", 2), "qkv": ("attn.qkv", None),
                "proj": ("attn.proj", None), "fc1": ("mlp.fc1", None), "fc2": ("mlp.fc2", None)}


@dataclass(frozen=True)
class LoRAConfig:
    # q and v of every block at rank 8, alpha 8: LoRA's own choice for attention (its Table 5), and the
    # setting behind V-PETL Bench's 0.29 M parameters on ViT-B/16
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        check_int("lora_rank", self.lora_rank, low=1)
        check_float("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        targets = self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise OptionError(f"option 'lora_targets': got {targets!r}, expected a non-empty list of "
                              f"{', '.join(map(repr, LORA_TARGETS))}")
        for t in targets:
            if not isinstance(t, str) or t not in LORA_TARGETS:  # a list or mapping inside: not a name
                raise OptionError(f"option 'lora_targets': unknown target {t!r}; expected some of "
                                  f"{', '.join(map(repr, LORA_TARGETS))}")
        if len(set(targets)) != len(targets) or ("qkv" in targets and {"q", "k", "v"} & set(targets)):
            raise OptionError(f"option 'lora_targets': {list(targets)} names a layer twice "
                              "('qkv' already covers q, k and v)")
        object.__setattr__(self, "lora_targets", tuple(targets))


class LowRankUpdate(nn.Module):
    """The low-rank updates of one linear layer: one (A, B) pair per updated slice of its output."""

    def __init__(self, linear: nn.Linear, slices: list[int | None], rank: int, scaling: float):
        super().__init__()
        out = linear.out_features if slices == [None] else linear.out_features // 3
        self.starts = [0 if s is None else s * out for s in slices]
        self.width, self.scaling = out, scaling
        factory = {"device": linear.weight.device, "dtype": torch.float32}
        self.lora_a = nn.Parameter(torch.empty(len(slices), rank, linear.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(len(slices), out, rank, **factory))
        for a in self.lora_a.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The weight update (out_features x in_features rows of the slices), for merging."""
        return self.scaling * (self.lora_b @ self.lora_a)  # (S, width, in)

    def add_update(self, module, args, out):
        x = args[0]
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        low = torch.einsum("...i,sri->...sr", x, a)
        update = torch.einsum("...sr,sor->...so", low, b) * self.scaling  # (..., S, width)
        parts, pos = [], 0
        for s, start in enumerate(self.starts):
            if start > pos:
                parts.append(out[..., pos:start])
            parts.append(out[..., start:start + self.width] + update[..., s, :])
            pos = start + self.width
        if pos < out.shape[-1]:
            parts.append(out[..., pos:])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class LoRA(ModuleMethod):
    name = "lora"
    config_class = LoRAConfig
    mergeable = True

    def build(self, vit):
        config = self.config
        scaling = config.lora_alpha / config.lora_rank
        self.updates = nn.ModuleList()
        self._targets: list[nn.Linear] = []
        for i, block in enumerate(blocks_of(vit, self.name)):
            by_module: dict[str, list[int | None]] = {}
            for t in config.lora_targets:
                path, third = LORA_TARGETS[t]
                by_module.setdefault(path, []).append(third)
            for path, slices in by_module.items():
                linear = submodule(block, path, nn.Linear, self.name, f"blocks[{i}]")
                if None not in slices and linear.out_features % 3:
                    raise OptionError(f"option 'lora_targets': blocks[{i}].{path} has {linear.out_features} "
                                      "outputs, not a fused q, k, v of equal thirds")
                update = LowRankUpdate(linear, sorted(slices, key=lambda s: -1 if s is None else s),
                                       config.lora_rank, scaling)
                width = min(linear.in_features, update.width)
                if config.lora_rank > width:  # the product B A cannot reach a rank above its smaller side
                    raise OptionError(f"option 'lora_rank': {config.lora_rank} is above the rank that "
                                      f"blocks[{i}].{path} can take ({width}); expected at most {width}")
                self.updates.append(update)
                self._targets.append(linear)
                self.hook(linear, update.add_update)

    def parameter_groups(self):
        return {"lora": [p for u in self.updates for p in (u.lora_a, u.lora_b)]}

    @torch.no_grad()
    def merged_state(self, vit):
        state = dict(vit.state_dict())
        for update, linear in zip(self.updates, self._targets):
            key = f"{module_name(vit, linear)}.weight"
            weight = state[key].clone()
            for s, start in enumerate(update.starts):
                weight[start:start + update.width] += update.delta()[s].to(weight.dtype)
            state[key] = weight
        return state
