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
    mergeable = True  # the backbone unchanged, the head its own

    def merged_state(self, vit):
        return dict(vit.state_dict())


class FullFineTune(TuningMethod):
    name = "full"
    config_class = NoOptions
    tunes_backbone = True
    mergeable = True

    def merged_state(self, vit):
        return dict(vit.state_dict())
