"""BitFit (Ben Zaken et al., ACL 2022): only the backbone's biases train.

The biases are those of every linear layer, convolution and LayerNorm of the backbone (the
patch projection, each block's qkv, proj, fc1, fc2, norm1 and norm2, the final norms), chosen by
module type; the head trains as in every method. They are the backbone's own tensors, tuned in
place, so an adapter stores them under the backbone's names and merging is the state dict itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import TuningMethod

BIASED = (nn.Linear, nn.Conv2d, nn.LayerNorm)


@dataclass(frozen=True)
class BitFitConfig:
    """BitFit takes no options."""


class BitFit(TuningMethod):
    name = "bitfit"
    config_class = BitFitConfig
    mergeable = True

    def attach(self, vit):
        head = vit.get_classifier()
        in_head = {id(m) for m in head.modules()}
        self._biases = [m.bias for m in vit.modules()
                        if isinstance(m, BIASED) and id(m) not in in_head and m.bias is not None]
        if not self._biases:
            raise ValueError("method 'bitfit' found no biases in this backbone")

    def backbone_parameters(self, vit):
        return list(self._biases)

    def parameter_groups(self):
        return {"biases": list(self._biases)}

    def merged_state(self, vit):
        return dict(vit.state_dict())
