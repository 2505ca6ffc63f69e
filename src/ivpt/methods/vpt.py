"""VPT-shallow and VPT-deep (Jia et al., ECCV 2022), as the official KMnP/vpt code runs them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..options import check_bool, check_float, check_int
from .base import BackboneShape, TuningMethod, make_prompts


@dataclass(frozen=True)
class VPTConfig:
    prompt_length: int = 10
    prompt_dropout: float = 0.0
    # average the prompt outputs with the patch tokens (VPT's VIT_POOL_TYPE "original" on MAE; docs/method.md)
    pool_prompts: bool = False

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length, low=1)  # 0: a linear probe under another name
        check_float("prompt_dropout", self.prompt_dropout, 0.0, 1.0, high_open=True)
        check_bool("pool_prompts", self.pool_prompts)


class PromptBank(TuningMethod):
    """The methods that learn prompts P_i for the first ``prompt_layers`` blocks (VPT, GateVPT, iVPT)."""

    config_class = VPTConfig

    def __init__(self, config, shape: BackboneShape, prompt_layers: int = 1):
        super().__init__(config, shape)
        # P_i for the first ``prompt_layers`` blocks
        self.prompts = make_prompts(prompt_layers, config.prompt_length, shape)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)

    @property
    def num_prompts(self) -> int:
        return self.config.prompt_length

    def learned(self, i: int, batch: int) -> torch.Tensor:
        """P_i for a batch, after prompt dropout."""
        return self.prompt_dropout(self.prompts[i].expand(batch, -1, -1))

    def first_prompts(self, batch: int) -> torch.Tensor | None:
        return self.learned(0, batch)

    def parameter_groups(self):
        return {"prompts": [self.prompts]}


class VPTShallow(PromptBank):
    """Q_0 = P_0; the prompt outputs are carried on: Q_{i+1} = Z_i."""

    name = "vpt-shallow"

    def next_prompts(self, i, z, q=None):
        return z


class VPTDeep(PromptBank):
    """Q_i = P_i for every block; Z_i is thrown away."""

    name = "vpt-deep"

    def __init__(self, config, shape):
        super().__init__(config, shape, prompt_layers=shape.depth)

    def next_prompts(self, i, z, q=None):
        return self.learned(i + 1, z.shape[0])


@dataclass(frozen=True)
class GateVPTConfig:
    prompt_length: int = 10
    prompt_dropout: float = 0.0
    # gate logits start at -gate_init, as the GateVPT code does (GATE_INIT = 10): sigmoid(-10) = 4.5e-5,
    # so at the start each block's prompts pass on nearly unchanged and training opens the gates
    gate_init: float = 10.0
    # GateVPT's learnable attention temperature: one scalar per block dividing its attention logits
    # (the code's TEMP_LEARN), starting at 1 and clamped to [0.01, 10] as the code clamps it
    learn_temperature: bool = False
    pool_prompts: bool = False  # as VPTConfig's

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length, low=1)
        check_float("prompt_dropout", self.prompt_dropout, 0.0, 1.0, high_open=True)
        check_float("gate_init", self.gate_init)
        check_bool("learn_temperature", self.learn_temperature)
        check_bool("pool_prompts", self.pool_prompts)


class GateVPT(PromptBank):
    """GateVPT (Yoo et al., ICML 2023): shallow prompts carried through the blocks, one learned scalar
    gate per block mixing its input and output prompt states: Q_{i+1} = g_i Z_i + (1 - g_i) Q_i,
    g_i = sigmoid(logit_i). Gates fully open (g = 1) give VPT-shallow exactly.
    """

    name = "gatevpt"
    config_class = GateVPTConfig

    def __init__(self, config, shape):
        super().__init__(config, shape, prompt_layers=1)
        self.gate_logits = nn.Parameter(torch.full((shape.depth - 1,), -float(config.gate_init)))
        self.temperatures = nn.ModuleList(
            [AttentionTemperature() for _ in range(shape.depth)] if config.learn_temperature else [])

    def attach(self, vit):
        # the temperature divides the logits q k^T * scale: dividing q (after timm's q_norm) does exactly that,
        # in the block's own SDPA, and AR-style saliency readers see the same attention
        self._handles = [block.attn.q_norm.register_forward_hook(temperature.divide)
                         for block, temperature in zip(vit.blocks, self.temperatures)]

    def next_prompts(self, i, z, q=None):
        gate = torch.sigmoid(self.gate_logits[i]).to(z.dtype)
        return gate * z + (1 - gate) * q

    def parameter_groups(self):
        groups = {"prompts": [self.prompts], "gates": [self.gate_logits]}
        if len(self.temperatures):
            groups["temperatures"] = [t.value for t in self.temperatures]
        return groups


TEMPERATURE_RANGE = (0.01, 10.0)


class AttentionTemperature(nn.Module):
    """One block's attention temperature t: softmax(q k^T * scale / t)."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.ones(()))

    def divide(self, module, args, q):
        if torch.is_grad_enabled() and self.value.requires_grad:
            # as GateVPT's code does: the stored value is clamped, then used as it is, so that it keeps its
            # gradient at a bound (a clamp in the graph would give it none there, for good). Through .data:
            # no version bump, so a graph that ran the model before (two views, one backward) stays valid;
            # the value it saved was in range already, so the clamp leaves it as it was
            self.value.data.clamp_(*TEMPERATURE_RANGE)
            return q / self.value.to(q.dtype)
        return q / self.value.clamp(*TEMPERATURE_RANGE).to(q.dtype)
