"""Optional packages: each is an extra of the ivpt package, and a missing one is named in one line."""
from __future__ import annotations

import importlib
from types import ModuleType

# module -> (extra, what needs it)
EXTRAS = {
    "matplotlib": ("explain", "drawing figures"),
    "huggingface_hub": ("hub", "reading and publishing Hub repositories"),
    "onnx": ("onnx", "ONNX export"),
    "onnxscript": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", "running ONNX files"),
}


def require(module: str, purpose: str | None = None, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        default_extra, default_purpose = EXTRAS.get(module, (None, None))
        extra, purpose = extra or default_extra, purpose or default_purpose or module
        hint = f"pip install 'ivpt[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"{purpose} needs {module}, which is not installed: {hint}") from None
