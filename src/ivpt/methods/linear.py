"""Linear probe (frozen backbone, head only) and full fine-tuning (everything trains)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import TuningMethod


@dataclass(frozen=True)
class NoOptions:
    """These methods take no options."""


class LinearProbe(TuningMethod):
    name = "linear"
    config_class = NoOptions


class FullFineTune(TuningMethod):
    name = "full"
    config_class = NoOptions
    tunes_backbone = True
