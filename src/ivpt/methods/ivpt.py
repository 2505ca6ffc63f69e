"""iVPT: cross-layer dynamic connection (CDC), dynamic aggregation (DA), attentive reinforcement (AR).

The equations are this project's reading of arXiv 2404.05207 (the paper's own equations are not
available to us); ``docs/method.md`` gives them. Every open choice is an option, and each option
has a setting that reduces to a known baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..options import OptionError, check_bool, check_choice, check_float, check_int
from .base import BackboneShape
from .vpt import _PromptBank

DA_MODES = ("gate", "channel", "static", "sum")
DA_SPACES = ("standardized", "raw")
AR_SOURCES = ("cls", "prompts")
AR_MIXES = ("mean", "attn")
STANDARDIZE_EPS = 1e-6


def standardize(x: torch.Tensor) -> torch.Tensor:
    """n(.): per-token standardisation (LayerNorm without affine)."""
    return F.layer_norm(x, x.shape[-1:], eps=STANDARDIZE_EPS)


@dataclass(frozen=True)
class IVPTConfig:
    prompt_length: int = 10
    prompt_dropout: float = 0.0
    cdc: bool = True
    da: str = "gate"  # the spec's reading of the paper; the preset "ivpt-static" is what won on our testbed
    da_space: str = "standardized"
    da_bias_init: float = 0.0
    ar: bool = True
    ar_source: str = "cls"
    ar_mix: str = "mean"
    ar_ratio: float = 0.25
    ar_gamma_init: float = 0.0
    layers: tuple[int, ...] | None = None  # transitions i (block i -> i+1) where CDC/DA and AR act

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length, low=1)
        check_float("prompt_dropout", self.prompt_dropout, 0.0, 1.0, high_open=True)
        check_bool("cdc", self.cdc)
        check_choice("da", self.da, DA_MODES)
        check_choice("da_space", self.da_space, DA_SPACES)
        check_float("da_bias_init", self.da_bias_init)
        check_bool("ar", self.ar)
        check_choice("ar_source", self.ar_source, AR_SOURCES)
        check_choice("ar_mix", self.ar_mix, AR_MIXES)
        check_float("ar_ratio", self.ar_ratio, 0.0, 1.0, low_open=True)
        check_float("ar_gamma_init", self.ar_gamma_init)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise OptionError(f"option 'layers': got {self.layers!r}, expected a list of transition indices or None")
            layers = tuple(sorted({check_int("layers", v, low=0) for v in self.layers}))
            object.__setattr__(self, "layers", layers)

    def transitions(self, depth: int) -> tuple[int, ...]:
        last = depth - 2
        if self.layers is None:
            return tuple(range(depth - 1))
        bad = [i for i in self.layers if i > last]
        if bad:
            raise OptionError(
                f"option 'layers': transition {bad[0]} does not exist; a backbone of depth {depth} "
                f"has transitions 0..{last} (transition i sits between block i and block i+1)"
            )
        return self.layers


class DynamicAggregation(nn.Module):
    """Q_{i+1} = alpha * n(Z_i) + (1 - alpha) * n(P_{i+1}), alpha as chosen by ``mode``."""

    def __init__(self, mode: str, space: str, dim: int, bias_init: float):
        super().__init__()
        self.mode, self.space = mode, space
        if mode in ("gate", "channel"):
            width = 1 if mode == "gate" else dim
            # w = 0 at start: the gate opens to sigmoid(bias_init) for every token alike
            self.w_z = nn.Parameter(torch.zeros(dim))
            self.w_p = nn.Parameter(torch.zeros(dim))
            self.bias = nn.Parameter(torch.full((width,) if mode == "channel" else (), float(bias_init)))
        elif mode == "static":
            self.theta = nn.Parameter(torch.tensor(float(bias_init)))
        self.last_alpha: torch.Tensor | None = None  # for inspection only

    def forward(self, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # z is a view of the block's whole output: autograd saving it would keep all B x T x d alive
        # until backward (6% more activation memory on ViT-B/16); a copy of the p prompt rows is enough
        z = z.clone()
        if self.space == "standardized":
            z, p = standardize(z), standardize(p)
        if self.mode == "sum":
            return z + p
        if self.mode == "gate":
            alpha = torch.sigmoid(z @ self.w_z + p @ self.w_p + self.bias).unsqueeze(-1)
        elif self.mode == "channel":
            alpha = torch.sigmoid(z * self.w_z + p * self.w_p + self.bias)
        else:
            alpha = torch.sigmoid(self.theta)
        self.last_alpha = alpha.detach()
        return alpha * z + (1 - alpha) * p


class AttentiveReinforcement(nn.Module):
    """E[j] += gamma * r for the top-K salient patches j; r from the next block's prompts."""

    def __init__(self, mix: str, ratio: float, gamma_init: float):
        super().__init__()
        self.mix, self.ratio = mix, ratio
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))

    def num_selected(self, num_patches: int) -> int:
        return max(1, math.floor(self.ratio * num_patches + 0.5))  # round half up (Python's round is half-even)

    def forward(self, patches: torch.Tensor, saliency: torch.Tensor,
                prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.num_selected(patches.shape[1])
        selected = saliency.detach().topk(k, dim=1).indices  # the selection carries no gradient
        mask = torch.zeros(patches.shape[:2], dtype=patches.dtype, device=patches.device)
        mask = mask.scatter(1, selected, 1.0).unsqueeze(-1)
        if self.mix == "mean":
            reinforcement = prompts.mean(dim=1, keepdim=True)
        else:
            scores = standardize(patches) @ standardize(prompts).transpose(1, 2) / math.sqrt(patches.shape[-1])
            reinforcement = scores.softmax(dim=-1) @ prompts
        return patches + self.gamma * mask * reinforcement, selected


class IVPT(_PromptBank):
    name = "ivpt"
    config_class = IVPTConfig

    def __init__(self, config: IVPTConfig, shape: BackboneShape):
        super().__init__(config, shape, prompt_layers=shape.depth)
        active = config.transitions(shape.depth)
        if config.ar and active and config.ar_source == "cls" and not shape.has_class_token:
            raise OptionError(
                "option 'ar_source': 'cls' needs a class token and this backbone has none; "
                "use ar_source='prompts' or ar=False"
            )
        dim = shape.embed_dim
        self.aggregation = nn.ModuleDict(
            {str(i): DynamicAggregation(config.da, config.da_space, dim, config.da_bias_init)
             for i in (active if config.cdc else ())}
        )
        self.reinforcement = nn.ModuleDict(
            {str(i): AttentiveReinforcement(config.ar_mix, config.ar_ratio, config.ar_gamma_init)
             for i in (active if config.ar else ())}
        )

    def next_prompts(self, i, z, q=None):
        learned = self.learned(i + 1, z.shape[0])
        gate = self.aggregation[str(i)] if str(i) in self.aggregation else None
        return learned if gate is None else gate(z, learned)

    def needs_saliency(self, i):
        return str(i) in self.reinforcement

    def reinforce(self, i, patches, saliency, prompts):
        return self.reinforcement[str(i)](patches, saliency, prompts)

    def parameter_groups(self):
        return {
            "prompts": [self.prompts],
            "da": list(self.aggregation.parameters()),
            "ar": list(self.reinforcement.parameters()),
        }


@dataclass(frozen=True)
class IVPTStaticConfig(IVPTConfig):
    da: str = "static"


class IVPTStatic(IVPT):
    """Preset: iVPT with the static connection (one learned sigmoid(theta) per transition).

    It beat the gate by 1.75 points of mean val top-1 on the offline suite's defaults sweep
    (docs/benchmarks.md); ``method="ivpt"`` stays the paper's method as the spec reads it.
    """

    name = "ivpt-static"
    config_class = IVPTStaticConfig
