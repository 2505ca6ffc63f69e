"""ivpt: visual prompt tuning (iVPT and its baselines) for timm Vision Transformers."""
from __future__ import annotations

from ._version import __version__

# Heavy parts (torch, timm) load on first use, so that `ivpt --help` answers at once.
_LAZY = {
    "load_adapter": ".adapter", "save_adapter": ".adapter", "DEFAULT_BACKBONE": ".backbones",
    "PromptedViT": ".encoder", "count_parameters": ".factory", "create_model": ".factory", "METHODS": ".methods",
    "OptionError": ".options", "train": ".api", "evaluate": ".api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ivpt' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BACKBONE",
    "METHODS",
    "OptionError",
    "PromptedViT",
    "count_parameters",
    "create_model",
    "evaluate",
    "train",
    "load_adapter",
    "save_adapter",
    "__version__",
]
