"""What every tuning method supplies to the prompted encoder.

The encoder (``ivpt.encoder.PromptedViT``) owns the loop over timm's blocks; a method only says
which prompts enter block 0, how the prompts of block i+1 follow from block i, and whether it
rewrites patch tokens between blocks (AR). Linear probe and full fine-tuning are methods with no
prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneShape:
    """The few facts about the backbone that a method's parameters depend on."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    has_class_token: bool


class TuningMethod(nn.Module):
    name: str = ""
    tunes_backbone: bool = False
    # the method's change can be folded into the backbone's own weights (ivpt export --merged)
    mergeable: bool = False

    def __init__(self, config, shape: BackboneShape):
        super().__init__()
        self.config = config
        self.shape = shape
        self._handles: list = []  # the forward hooks ``attach`` put on the backbone's modules

    @property
    def hook_ids(self) -> set[int]:
        """The ids of this method's hooks on the backbone, to take them off again (``strip_hooks``)."""
        return {h.id for h in self._handles}

    @property
    def num_prompts(self) -> int:
        return 0

    def first_prompts(self, batch: int) -> torch.Tensor | None:
        """Q_0 as (batch, p, d), or None when the method has no prompts."""
        return None

    def next_prompts(self, i: int, z: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor | None:
        """Q_{i+1} from Z_i (the prompt outputs of block i) and Q_i (the prompts that entered it), i = 0..N-2."""
        return None

    def next_prompts_explained(self, i: int, z: torch.Tensor,
                               q: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``next_prompts`` and the weights with which it mixed Z_i in (None: no such weights), for a traced
        pass (``PromptedViT.forward_traced``); the prompts are the very ones ``next_prompts`` gives."""
        return self.next_prompts(i, z, q), None

    def key_value_prompts(self, i: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values (batch, heads, n, head_dim) that block i's attention attends to beside the tokens' own,
        placed before them (E2VPT); they add no query, so the block's output keeps its tokens. None: none."""
        return None

    def aggregates_block_output(self, i: int) -> bool:
        """Whether Q_{i+1} is a function of Z_i that ``next_prompts_from_residual`` can compute itself."""
        return False

    def next_prompts_from_residual(self, i: int, residual: torch.Tensor, block: nn.Module,
                                   q: torch.Tensor) -> torch.Tensor:
        """Q_{i+1} from the prompt rows' state after block i's attention half (their MLP half not yet run,
        ``ivpt.encoder.finish_block`` runs it), for the encoder's deferred transitions while training."""
        raise NotImplementedError

    def needs_saliency(self, i: int) -> bool:
        """Whether ``reinforce`` acts after block i (the encoder then computes the saliency)."""
        return False

    def reinforce(self, i: int, patches: torch.Tensor, saliency: torch.Tensor,
                  prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The method's own tuned tensors by component, for counting and optimiser groups: every component
        the method has, each under its own name (``count_parameters`` reports exactly these)."""
        return {}

    @property
    def logs_diagnostics(self) -> bool:
        """Whether training logs this method's learned per-transition quantities every epoch (DA's weight,
        AR's gamma and relative change: ``ivpt.explain.epoch_diagnostics``)."""
        return False

    # -- methods that act inside the backbone (ivpt.methods.modules) ----------------------------
    def attach(self, vit: nn.Module) -> None:
        """Called once by the encoder with its timm ViT, before anything trains: hook modules in."""

    def backbone_parameters(self, vit: nn.Module) -> list[nn.Parameter]:
        """The backbone's own tensors that this method tunes in place (BitFit's biases)."""
        return []

    def merged_state(self, vit: nn.Module) -> dict[str, torch.Tensor]:
        """The backbone's state dict with the method's change folded in (``mergeable`` methods only)."""
        raise ValueError(f"method {self.name!r} cannot be merged into the backbone's weights: "
                         + ("it adds prompt tokens, which no timm checkpoint can hold"
                            if self.num_prompts else "its change is not linear in the weights")
                         + "; share the adapter folder instead")


def prompt_init_bound(shape: BackboneShape) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_h * patch_w + d))."""
    ph, pw = shape.patch_size
    return math.sqrt(6.0 / (3 * ph * pw + shape.embed_dim))


def make_prompts(count: int, length: int, shape: BackboneShape) -> nn.Parameter:
    bound = prompt_init_bound(shape)
    prompts = nn.Parameter(torch.empty(count, length, shape.embed_dim))
    nn.init.uniform_(prompts, -bound, bound)
    return prompts
