"""Bottleneck adapters: a small MLP per block, after the block's MLP (Houlsby-style, ``sequential``)
or beside it (AdaptFormer, Chen et al., NeurIPS 2022: ``parallel``).

    sequential:  MLP'(x) = y + s * up(act(down(y))),   y = MLP(x)
    parallel:    MLP'(x) = MLP(x) + s * up(act(down(x)))

x is the MLP's input (the output of ``norm2``). down (d -> bottleneck) is initialised as
nn.Linear's weights with a zero bias, up (bottleneck -> d) at zero, as AdaptFormer's code does, so
training starts from the pretrained model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..options import OptionError, check_choice, check_float, check_int
from .modules import ModuleMethod, blocks_of, submodule

PLACEMENTS = ("sequential", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class AdapterConfig:
    # bottleneck 8: the width behind V-PETL Bench's 0.16 M parameters for Adapter and AdaptFormer on ViT-B/16
    bottleneck: int = 8
    placement: str = "sequential"
    adapter_scale: float = 1.0   # s; AdaptFormer's 0.1 is the preset 'adaptformer'
    adapter_act: str = "relu"    # AdaptFormer's ReLU

    def __post_init__(self):
        check_int("bottleneck", self.bottleneck, low=1)
        check_choice("placement", self.placement, PLACEMENTS)
        # s = 0 would train nothing (the adapter adds 0 and gets no gradient): refused, as lora_alpha 0 is
        check_float("adapter_scale", self.adapter_scale, 0.0, low_open=True)
        check_choice("adapter_act", self.adapter_act, ACTIVATIONS)


@dataclass(frozen=True)
class AdaptFormerConfig(AdapterConfig):
    placement: str = "parallel"
    adapter_scale: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.placement != "parallel":  # else 'adaptformer' would silently train a Houlsby adapter
            raise OptionError(f"option 'placement': method 'adaptformer' is the parallel adapter, got "
                              f"{self.placement!r}; for a sequential adapter use method 'adapter'")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, width: int, act: str, scale: float, parallel: bool, device):
        super().__init__()
        self.down = nn.Linear(dim, width, device=device)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(width, dim, device=device)
        self.scale, self.parallel = scale, parallel
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def add_adapter(self, module, args, out):
        source = args[0] if self.parallel else out
        return out + self.scale * self.up(self.act(self.down(source)))


class Adapter(ModuleMethod):
    name = "adapter"
    config_class = AdapterConfig

    def build(self, vit):
        c = self.config
        self.adapters = nn.ModuleList()
        for i, block in enumerate(blocks_of(vit, self.name)):
            mlp = submodule(block, "mlp", nn.Module, self.name, f"blocks[{i}]")
            fc1 = submodule(block, "mlp.fc1", nn.Linear, self.name, f"blocks[{i}]")
            adapter = Bottleneck(fc1.in_features, c.bottleneck, c.adapter_act, c.adapter_scale,
                                 c.placement == "parallel", fc1.weight.device)
            self.adapters.append(adapter)
            self.hook(mlp, adapter.add_adapter)

    def parameter_groups(self):
        return {"adapters": list(self.adapters.parameters())}


class AdaptFormer(Adapter):
    """The preset: parallel placement, s = 0.1 (AdaptFormer's VTAB setting)."""

    name = "adaptformer"
    config_class = AdaptFormerConfig

