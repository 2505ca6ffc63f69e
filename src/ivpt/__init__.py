"""ivpt: visual prompt tuning (iVPT and its baselines) for timm Vision Transformers."""
from __future__ import annotations

from ._version import __version__

from .adapter import load_adapter, save_adapter
from .backbones import DEFAULT_BACKBONE
from .encoder import PromptedViT
from .factory import count_parameters, create_model
from .methods import METHODS
from .options import OptionError

__all__ = [
    "DEFAULT_BACKBONE",
    "METHODS",
    "OptionError",
    "PromptedViT",
    "count_parameters",
    "create_model",
    "load_adapter",
    "save_adapter",
    "__version__",
]
