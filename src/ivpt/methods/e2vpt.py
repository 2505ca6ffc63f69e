"""E2VPT (C. Han et al., "E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023),
as its code (ChengHan111/E2VPT) runs it: VPT-deep input prompts, plus learnable key-value prompts inside
every block's self-attention (``src/models/vit_backbones/vit_changeVK.py``), and the pruning of input prompt
tokens and of their pieces with rewinding (``src/models/vit_prompt/vit_prompt_VK.py``,
``src/engine/trainer.py``, ``tune_vtab_PruningRewind_CVK.py``; the stage itself is ``ivpt.engine.pruning``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..options import OptionError, check_bool, check_choice, check_float, check_int
from .base import BackboneShape
from .vpt import PromptBank

KV_INITS = ("kaiming", "uniform", "trunc_normal")  # the code's ORIGIN_INIT 2, 0, 1


@dataclass(frozen=True)
class E2VPTConfig:
    prompt_length: int = 5              # NUM_TOKENS_P: input prompts per block (VPT-deep)
    prompt_dropout: float = 0.0         # DROPOUT_P
    kv_length: int = 5                  # NUM_TOKENS: key-value prompts per block and head; 0 is VPT-deep exactly
    kv_shared: bool = True              # SHARE_PARAM_KV: one tensor serves as the keys and as the values
    kv_init: str = "kaiming"            # ORIGIN_INIT 2 (the configs' choice); "uniform" is 0, "trunc_normal" 1
    kv_dropout: float = 0.0             # DROPOUT: on the key-value prompts, in training
    # MASK_CLS_TOKEN with CLS_TOKEN_MASK and CLS_TOKEN_MASK_PIECES: learned scales on the input prompts' tokens
    # (p) and pieces (p x mask_pieces), all starting at 1; the tuning protocol then scores them and rewinds
    prune: bool = False
    mask_pieces: int = 16               # CLS_TOKEN_P_PIECES_NUM: piece j of a token holds the dims c with c % 16 == j
    # a rewound model's masks (the code's REWIND_STATUS): these tokens, and per token these pieces, are zero in
    # every block's input prompts; only the surviving values are tensors (what the adapter stores)
    pruned_tokens: tuple[int, ...] = ()
    pruned_pieces: tuple[tuple[int, ...], ...] = ()
    pool_prompts: bool = False          # as VPTConfig's

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length, low=1)
        check_float("prompt_dropout", self.prompt_dropout, 0.0, 1.0, high_open=True)
        check_int("kv_length", self.kv_length, low=0)
        check_bool("kv_shared", self.kv_shared)
        check_choice("kv_init", self.kv_init, KV_INITS)
        check_float("kv_dropout", self.kv_dropout, 0.0, 1.0, high_open=True)
        check_bool("prune", self.prune)
        check_int("mask_pieces", self.mask_pieces, low=1)
        check_bool("pool_prompts", self.pool_prompts)
        # JSON and YAML give lists: stored as tuples, so that the config stays hashable and compares equal
        object.__setattr__(self, "pruned_tokens", self._indices("pruned_tokens", self.pruned_tokens,
                                                                self.prompt_length))
        pieces = self.pruned_pieces
        if not isinstance(pieces, (list, tuple)) or (pieces and len(pieces) != self.prompt_length):
            raise OptionError(f"option 'pruned_pieces': got {pieces!r}, expected one list of pruned piece indices per "
                              f"prompt token ({self.prompt_length} lists), or none")
        object.__setattr__(self, "pruned_pieces", tuple(
            self._indices(f"pruned_pieces[{t}]", row, self.mask_pieces) for t, row in enumerate(pieces)))
        if self.prune and self.is_pruned:
            raise OptionError("option 'prune': a model with pruned_tokens or pruned_pieces is already pruned (a rewound "
                              "model); prune asks for the learned masks of the first stage. Drop one of them")
        if len(self.pruned_tokens) == self.prompt_length:
            raise OptionError(f"option 'pruned_tokens': all {self.prompt_length} prompt tokens pruned; E2VPT keeps at "
                              "least one (MIN_NUMBER_CLS_TOKEN)")

    @staticmethod
    def _indices(name: str, values, count: int) -> tuple[int, ...]:
        if not isinstance(values, (list, tuple)):
            raise OptionError(f"option {name!r}: got {values!r}, expected a list of indices in [0, {count - 1}]")
        for v in values:
            check_int(name, v, low=0, high=count - 1)
        if len(set(values)) != len(values):
            raise OptionError(f"option {name!r}: index listed twice in {list(values)}")
        return tuple(sorted(values))

    @property
    def is_pruned(self) -> bool:
        return bool(self.pruned_tokens) or any(self.pruned_pieces)


def kv_init_(tensor: torch.Tensor, how: str, shape: BackboneShape) -> None:
    """The code's ORIGIN_INIT on one block's (H, n, d_h) key-value prompts."""
    if how == "kaiming":  # kaiming_uniform_(a=0, fan_in, leaky_relu): fan_in = n * d_h, bound sqrt(6 / fan_in)
        nn.init.kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu")
    elif how == "trunc_normal":
        nn.init.trunc_normal_(tensor, std=0.02)
    else:  # the code's uniform bound: VPT's formula with 16 where VPT has d (sic)
        ph, pw = shape.patch_size
        bound = math.sqrt(6.0 / (3 * ph * pw + 16))
        nn.init.uniform_(tensor, -bound, bound)


def survivors(config: E2VPTConfig, d: int) -> torch.Tensor:
    """(p, d) bool: the input-prompt values a rewound model keeps (piece of dim c: c % mask_pieces)."""
    cpu = torch.device("cpu")  # from the config alone, also while a model is built on the meta device
    keep = torch.ones(config.prompt_length, d, dtype=torch.bool, device=cpu)
    keep[list(config.pruned_tokens)] = False
    piece_of_dim = torch.arange(d, device=cpu) % config.mask_pieces
    for token, pieces in enumerate(config.pruned_pieces):
        keep[token] &= ~torch.isin(piece_of_dim, torch.tensor(pieces, dtype=torch.long, device=cpu))
    return keep


class E2VPT(PromptBank):
    """Q_i = M * P_i (VPT-deep; M the pruning masks, all ones unless pruned); block i's attention also attends
    to n key-value prompts per head, K_i and V_i (H, n, d_h), placed before the tokens' own keys and values:
    softmax(q [K_i | k]^T / sqrt(d_h)) [V_i | v]. Shared (the default): V_i = K_i."""

    name = "e2vpt"
    config_class = E2VPTConfig

    def __init__(self, config: E2VPTConfig, shape: BackboneShape):
        super().__init__(config, shape, prompt_layers=shape.depth)
        d, p = shape.embed_dim, config.prompt_length
        if d % config.mask_pieces:
            raise OptionError(f"option 'mask_pieces': {config.mask_pieces} does not divide the backbone's width {d}")
        if config.is_pruned:
            # only what survives is a tensor; the same draws as an unpruned model, so a rewound model with the
            # seed of the first stage starts from the same surviving values (the code masks a fresh full init)
            keep = survivors(config, d).flatten()
            self.register_buffer("kept_index", keep.nonzero().squeeze(1), persistent=False)  # from the config
            full = self.prompts.detach()
            del self.prompts
            self.prompt_values = nn.Parameter(full.reshape(shape.depth, p * d)[:, self.kept_index.to(full.device)].clone())
        self.token_scales = nn.Parameter(torch.ones(p)) if config.prune else None
        self.piece_scales = nn.Parameter(torch.ones(p, config.mask_pieces)) if config.prune else None
        self.kv_prompts = self.key_prompts = self.value_prompts = None
        if config.kv_length:
            for name in ("kv_prompts",) if config.kv_shared else ("key_prompts", "value_prompts"):
                setattr(self, name, nn.Parameter(self._new_kv(config, shape)))
        self.kv_dropout = nn.Dropout(config.kv_dropout)

    @staticmethod
    def _new_kv(config: E2VPTConfig, shape: BackboneShape) -> torch.Tensor:
        """(N, H, n, d_h), each block's (H, n, d_h) initialised on its own, as the code's per-block tensors."""
        tensor = torch.empty(shape.depth, shape.num_heads, config.kv_length, shape.embed_dim // shape.num_heads)
        for block in tensor:
            kv_init_(block, config.kv_init, shape)
        return tensor

    def block_prompts(self, i: int) -> torch.Tensor:
        """P_i (p, d), pruned values zero."""
        if not self.config.is_pruned:
            return self.prompts[i]
        p, d = self.config.prompt_length, self.shape.embed_dim
        values = self.prompt_values[i]
        return values.new_zeros(p * d).index_copy(0, self.kept_index, values).view(p, d)

    def learned(self, i: int, batch: int) -> torch.Tensor:
        prompts = self.prompt_dropout(self.block_prompts(i).expand(batch, -1, -1))  # dropout, then the masks
        if self.config.prune:  # the pieces' scales (strided over the width), then the tokens', as the code does
            pieces = self.piece_scales.repeat(1, self.shape.embed_dim // self.config.mask_pieces)
            prompts = prompts * pieces.to(prompts.dtype) * self.token_scales.to(prompts.dtype).unsqueeze(-1)
        return prompts

    def next_prompts(self, i, z, q=None):
        return self.learned(i + 1, z.shape[0])

    def key_value_prompts(self, i: int, batch: int):
        if not self.config.kv_length:
            return None
        keys = self.kv_prompts if self.config.kv_shared else self.key_prompts
        values = self.kv_prompts if self.config.kv_shared else self.value_prompts
        # dropout drawn for the keys and the values apart, as the code calls its dropout twice
        return (self.kv_dropout(keys[i].expand(batch, -1, -1, -1)),
                self.kv_dropout(values[i].expand(batch, -1, -1, -1)))

    def parameter_groups(self):
        groups = {"prompts": [self.prompt_values if self.config.is_pruned else self.prompts]}
        kv = [t for t in (self.kv_prompts, self.key_prompts, self.value_prompts) if t is not None]
        if kv:
            groups["kv_prompts"] = kv
        if self.config.prune:
            groups["masks"] = [self.token_scales, self.piece_scales]
        return groups
