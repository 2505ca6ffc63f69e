"""Registry of tuning methods: name -> class (each class names its config dataclass)."""
from __future__ import annotations

from .base import BackboneShape, TuningMethod
from .ivpt import IVPT, IVPTConfig, IVPTStatic
from .linear import FullFineTune, LinearProbe
from .vpt import GateVPT, VPTConfig, VPTDeep, VPTShallow

METHODS: dict[str, type[TuningMethod]] = {
    cls.name: cls for cls in (LinearProbe, FullFineTune, VPTShallow, VPTDeep, GateVPT, IVPT, IVPTStatic)
}

__all__ = ["METHODS", "BackboneShape", "TuningMethod", "IVPTConfig", "VPTConfig"]
