"""VFPT (R. Zeng et al., "Visual Fourier Prompt Tuning", NeurIPS 2024), as its code (runtsang/VFPT,
``src/models/vit_prompt/vit_fourier.py``) runs it: VPT-deep whose first share of each block's prompts
passes through the real part of a 2-D discrete Fourier transform over the prompt sequence and hidden
dimensions before entering the block."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..options import OptionError, check_bool, check_choice, check_float, check_int
from .base import BackboneShape
from .vpt import PromptBank

FOURIER_DIMS = ("all", "sequence", "hidden")
FOURIER_LOCATIONS = ("prepend", "append")


@dataclass(frozen=True)
class VFPTConfig:
    prompt_length: int = 10
    prompt_dropout: float = 0.0
    # the share of each block's p prompts that are Fourier prompts: k = floor(p * share) (the code's
    # FOURIER_PERCENTAGE, default 0.5); 0 is VPT-deep exactly
    fourier_share: float = 0.5
    fourier_dims: str = "all"            # FOURIER_DIMENSION: both, or only the sequence or hidden axis
    fourier_location: str = "prepend"    # FOURIER_LOCATION: the Fourier prompts before or after the others
    fourier_first_layer: bool = True     # FOURIER_FIRST_LAYER: block 0's prompts transformed too
    pool_prompts: bool = False           # as VPTConfig's

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length, low=1)
        check_float("prompt_dropout", self.prompt_dropout, 0.0, 1.0, high_open=True)
        check_float("fourier_share", self.fourier_share, 0.0, 1.0)
        check_choice("fourier_dims", self.fourier_dims, FOURIER_DIMS)
        check_choice("fourier_location", self.fourier_location, FOURIER_LOCATIONS)
        check_bool("fourier_first_layer", self.fourier_first_layer)
        check_bool("pool_prompts", self.pool_prompts)
        if self.fourier_share > 0 and self.fourier_count == 0:
            raise OptionError(
                f"option 'fourier_share': {self.fourier_share} of prompt_length {self.prompt_length} is "
                f"floor({self.prompt_length * self.fourier_share:g}) = 0 Fourier prompts, which is VPT-deep; raise "
                "fourier_share or prompt_length, or ask for method vpt-deep")

    @property
    def fourier_count(self) -> int:
        return math.floor(self.prompt_length * self.fourier_share)  # the code's own rounding, float product included


def dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the n-point DFT matrix F[j, l] = exp(-2 pi i j l / n) = C - i S (both symmetric)."""
    index = torch.arange(n, dtype=torch.float64)
    angle = (torch.outer(index, index) % n) * (2 * math.pi / n)  # the product reduced mod n: exact angles
    return torch.cos(angle).float(), torch.sin(angle).float()


class VFPT(PromptBank):
    """Q_i = [Re(F_k P_i[:k] F_d) | P_i[k:]] (or the Fourier prompts appended), F the DFT matrices."""

    name = "vfpt"
    config_class = VFPTConfig

    def __init__(self, config: VFPTConfig, shape: BackboneShape):
        super().__init__(config, shape, prompt_layers=shape.depth)
        k, d = config.fourier_count, shape.embed_dim
        # Re(F_k X F_d) = C_k X C_d - S_k X S_d for a real X: the code's fft(fft(x, -1), -2).real as real
        # matrix products, which torch.compile, bf16 autocast and ONNX export take (complex tensors they do not)
        dims = config.fourier_dims
        for name, n, used in (("seq", k, dims in ("all", "sequence")), ("hidden", d, dims in ("all", "hidden"))):
            cos, sin = dft_matrices(n) if k and used else (None, None)
            self.register_buffer(f"{name}_cos", cos, persistent=False)  # derived from the shape: never stored
            self.register_buffer(f"{name}_sin", sin if dims == "all" else None, persistent=False)

    def transforms(self, i: int) -> bool:
        return self.config.fourier_count > 0 and (i > 0 or self.config.fourier_first_layer)

    def fourier(self, x: torch.Tensor) -> torch.Tensor:
        """The real part of the DFT of x (..., k, d) over the axes ``fourier_dims`` names."""
        dims = self.config.fourier_dims
        # in float32 whatever the autocast: the code's torch.fft runs in float32, and a d-term sum in bf16 would not
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if dims == "sequence":
                return self.seq_cos @ x
            if dims == "hidden":
                return x @ self.hidden_cos
            return self.seq_cos @ x @ self.hidden_cos - self.seq_sin @ x @ self.hidden_sin

    def learned(self, i: int, batch: int) -> torch.Tensor:
        prompts = super().learned(i, batch)  # prompt dropout first, as the code does
        if not self.transforms(i):
            return prompts
        k = self.config.fourier_count
        fourier, plain = self.fourier(prompts[:, :k]), prompts[:, k:]
        return torch.cat([fourier, plain] if self.config.fourier_location == "prepend" else [plain, fourier], dim=1)

    def next_prompts(self, i, z, q=None):
        return self.learned(i + 1, z.shape[0])
