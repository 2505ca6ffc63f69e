"""Registry of tuning methods: name -> class (each class names its config dataclass)."""
from __future__ import annotations

import dataclasses

from .base import BackboneShape, TuningMethod
from .bitfit import BitFit
from .bottleneck import AdaptFormer, Adapter
from .e2vpt import E2VPT, E2VPTConfig
from .ivpt import IVPT, IVPTConfig, IVPTStatic
from .linear import FullFineTune, LinearProbe
from .lora import LoRA
from .modules import AttachError, ModuleMethod
from .ssf import SSF
from .vfpt import VFPT, VFPTConfig
from .vpt import GateVPT, VPTConfig, VPTDeep, VPTShallow

METHODS: dict[str, type[TuningMethod]] = {
    cls.name: cls for cls in (LinearProbe, FullFineTune, VPTShallow, VPTDeep, GateVPT, VFPT, E2VPT, IVPT, IVPTStatic,
                              LoRA, Adapter, AdaptFormer, SSF, BitFit)
}


def prompt_options(method: str, prompt_length: int) -> dict:
    """``{"prompt_length": p}`` for the methods that take prompts, ``{}`` for the others."""
    fields = {f.name for f in dataclasses.fields(METHODS[method].config_class)}
    return {"prompt_length": prompt_length} if "prompt_length" in fields else {}


__all__ = ["METHODS", "AttachError", "BackboneShape", "ModuleMethod", "TuningMethod", "E2VPTConfig", "IVPTConfig", "VFPTConfig", "VPTConfig", "prompt_options"]
