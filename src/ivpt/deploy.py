"""Deploy a tuned model without ivpt: an ONNX file that onnxruntime (or TensorRT, or any ONNX runtime) runs.

The file is PyTorch's own export (``torch.onnx.export``, the torch.export-based exporter) of the
eval-mode model: one graph with a dynamic batch dimension (segmentation: dynamic height and width
too, in whole patches), AR's top-k selection, DA's mixing and GateVPT's gates included; methods that
merge (LoRA, SSF, BitFit, linear, full) are exported merged, as the plain timm ViT they fold into.
What a consumer needs besides the graph travels in the file's metadata (``metadata_props``, keys
``ivpt.*``, JSON values): class names, input size, mean and std, the resize and crop, the method and
the sha256 of the adapter's tensors. ``read_metadata`` reads them back and refuses a damaged or
foreign file by name.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .adapter_format import tensors_digest
from .extras import require

OPSET = 18  # onnxruntime 1.16+ runs it; the exporter's own default at the time of writing
FORMAT = "ivpt-onnx"
FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PREFIX = "ivpt."
REQUIRED_KEYS = ("task", "method", "num_classes", "class_names", "mean", "std", "preprocess", "input_name",
                 "output_name", "adapter_sha256")


class OnnxFileError(ValueError):
    """A file that is not an ONNX model ivpt exported (damaged, truncated, or someone else's)."""


def input_size(config: dict[str, Any]) -> int:
    """The side of the square input an adapter record says its model takes (224 where it records none)."""
    size = config.get("image_size")
    return int(size[-1] if isinstance(size, (list, tuple)) else size) if size else 224


def preprocess_of(config: dict[str, Any], pretrained_cfg: dict | None = None) -> dict[str, Any]:
    """How images are prepared for a classification adapter, as data: what ``transform_of`` builds, and
    what an ONNX file carries for runtimes without ivpt. As the adapter's data was evaluated: a folder's
    recorded reading (resize + centre crop, or squash), FGVC's resize + centre crop, else VTAB's resize."""
    from .data.transforms import timm_resize
    from .engine.data import adapter_folder_reading, adapter_reads_upright

    size = input_size(config)
    data = config.get("data") or {}
    interpolation = config.get("interpolation", "bilinear")
    resize, crop = [size, size], None  # VTAB-1k: a square resize, no crop
    if data.get("kind") == "folder" and pretrained_cfg is not None:
        reading_cfg = {**pretrained_cfg, "input_size": (3, size, size)}
        reading = adapter_folder_reading(data, reading_cfg)  # as the adapter's run read its own images
        interpolation = pretrained_cfg.get("interpolation", "bilinear")
        if reading.get("preprocess", "crop") == "crop":
            resize, crop = reading.get("resize") or timm_resize(reading_cfg), size
    elif data.get("kind") == "fgvc":
        resize, crop = round(size * 256 / 224), size
    return {"resize": resize, "crop": crop, "interpolation": interpolation, "mean": list(config["mean"]),
            "std": list(config["std"]), "exif_orientation": adapter_reads_upright(data)}


def transform_of(preprocess: dict[str, Any]):
    """The torchvision pipeline of a ``preprocess_of`` description: resize (the shorter side to an int, or
    to [height, width]), an optional centre crop, to a tensor, normalise."""
    from torchvision import transforms as T

    from .data.transforms import interpolation_mode

    resize = preprocess["resize"]
    steps = [T.Resize(tuple(resize) if isinstance(resize, list) else resize,
                      interpolation=interpolation_mode(preprocess["interpolation"]))]
    if preprocess.get("crop"):
        steps.append(T.CenterCrop(preprocess["crop"]))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(preprocess["mean"], preprocess["std"])])


def export_onnx(model: torch.nn.Module, path, config: dict[str, Any] | None = None, *,
                opset: int = OPSET) -> dict[str, Any]:
    """Write ``model`` (a PromptedViT or SegmentationModel) as an ONNX file at ``path``; returns the metadata
    written into it. ``config``: the adapter's record (default: the model's own ``adapter_config()``),
    whose data spec says how images are read."""
    onnx = require("onnx", "exporting to ONNX", "onnx")
    require("onnxscript", "exporting to ONNX", "onnx")
    from .engine.checkpoint import atomic_write

    config = config or {**model.adapter_config(), **model.recorded}
    segmentation = config.get("task") == "segmentation"
    if not segmentation and not config.get("data"):
        size = input_size(config)
        warnings.warn(f"the model records no dataset, so the file says to read images as VTAB-1k does (a square "
                      f"resize to {size} px); export a saved adapter (ivpt.load_adapter, or ivpt export) to carry "
                      "its own reading (a folder's resize and crop, FGVC's crop)", stacklevel=3)
    model.eval()
    graph, merged = model, False
    if not segmentation:
        try:
            graph, merged = model.merge(), True  # the plain timm model it folds into: the leanest graph
        except ValueError:
            pass  # prompt methods and bottleneck adapters add computation: exported as they run
    example, dynamic = _example(model, config, segmentation)
    try:  # the exporter's progress lines go to stdout: kept out of the command's own output
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=(dynamic,),
                                         opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         external_data=False, verbose=False)
    except MemoryError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"method {config.get('method')!r} could not be exported to ONNX by torch.onnx.export "
                         f"({type(err).__name__}: {first}); share the adapter folder instead") from err
    proto = program.model_proto
    # the opset the file holds (the exporter keeps its own where converting to the one asked for fails)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    metadata = _metadata(model, config, merged, opset, segmentation)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value)
    atomic_write(Path(path), lambda tmp: onnx.save_model(proto, str(tmp)))
    return metadata


def _example(model, config: dict, segmentation: bool):
    """An example input and its dynamic dimensions: the batch; for segmentation also height and width, in
    whole patches (the sliding window feeds the crop size, or less at an image's edge)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    if not segmentation:
        size = input_size(config)
        return torch.randn(2, 3, size, size), {0: batch}
    patch, crop = model.patch_size, int(config["crop_size"])
    rows, cols = Dim("patch_rows", min=1, max=4096), Dim("patch_cols", min=1, max=4096)
    return torch.randn(2, 3, crop, crop), {0: batch, 2: patch * rows, 3: patch * cols}


def _metadata(model, config: dict, merged: bool, opset: int, segmentation: bool) -> dict[str, Any]:
    backbone = config.get("backbone") or {}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "ivpt_version": __version__, "opset": opset,
            "task": config.get("task", "classification"), "method": config.get("method"),
            "options": config.get("options") or {}, "merged": merged, "backbone": backbone.get("name"),
            "adapter_sha256": tensors_digest(model.adapter_tensors()), "num_classes": config["num_classes"],
            "class_names": config.get("class_names"), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "image_size": list(config["image_size"]) if config.get("image_size") else None,
            "mean": list(config["mean"]), "std": list(config["std"])}
    if segmentation:
        from .engine.segdata import base_size

        opts = config.get("segmentation") or {}
        crop = int(config["crop_size"])
        # ivpt predict's reading (ivpt.data.segmentation.SegEvalTransform and slide_inference): photos turned
        # upright, resized bilinearly by min(base long / image long, base short / image short) with each
        # side rounded to a multiple of the patch, normalised; crop x crop windows at stride, averaged;
        # the logits resized bilinearly to the photo's size
        meta["preprocess"] = {"base_size": list(base_size(opts, (config.get("data") or {}).get("kind"), crop)),
                              "crop_size": crop, "stride": crop * 2 // 3, "patch_size": model.patch_size,
                              "interpolation": "bilinear", "mean": meta["mean"], "std": meta["std"],
                              "exif_orientation": True}
    else:
        meta["preprocess"] = preprocess_of(config, getattr(model.backbone, "pretrained_cfg", None) or {})
    return meta


def read_metadata(path) -> dict[str, Any]:
    """The ``ivpt.*`` metadata of an ONNX file ivpt exported; a damaged or foreign file refused by name."""
    onnx = require("onnx", "reading an ONNX file", "onnx")
    path = Path(path)
    if path.is_dir():
        raise OnnxFileError(f"{path} is a folder; expected an .onnx file written by ivpt export --onnx (an adapter "
                            "folder runs without --onnx)")
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:
        raise OnnxFileError(f"{path} is not a readable ONNX file ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'damaged'}); export it again with "
                            "ivpt export ADAPTER --onnx OUT.onnx") from None
    props = {p.key[len(PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}
    if props.get("format") != json.dumps(FORMAT):
        raise OnnxFileError(f"{path} is an ONNX model without ivpt's metadata (no ivpt.format); ivpt predict "
                            "runs files written by ivpt export --onnx, which carry the preprocessing and class "
                            "names; run other files with onnxruntime directly")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except json.JSONDecodeError as err:
        raise OnnxFileError(f"{path}: its ivpt metadata is damaged ({err}); export it again") from None
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise OnnxFileError(f"{path} was written by a newer ivpt (format version {meta.get('format_version')}); "
                            f"upgrade ivpt (this one reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing or not isinstance(meta.get("preprocess"), dict):
        raise OnnxFileError(f"{path}: its ivpt metadata lacks {', '.join(missing) or 'a preprocess mapping'} "
                            "(altered after export?); export it again")
    return meta


class OnnxModel:
    """An exported file run by onnxruntime, called like the PyTorch model it came from (tensor in, tensor
    out), so that ivpt's predict and sliding-window code serve both."""

    def __init__(self, path, device: torch.device | None = None, fall_back: bool = False):
        """device: where to run (a CUDA device needs onnxruntime-gpu; fall_back: else the CPU, as --device auto
        means)."""
        ort = require("onnxruntime", "running an ONNX file", "onnx")
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and not (
                fall_back and "CUDAExecutionProvider" not in ort.get_available_providers()):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--device cuda with --onnx needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                                 "this onnxruntime runs on the CPU only")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.device = device if len(providers) > 1 else torch.device("cpu")  # where the session computes
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as err:
            raise OnnxFileError(f"{self.path}: onnxruntime cannot load it ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'damaged'}); export it again") from None
        self.num_classes = self.meta["num_classes"]
        self.class_names = self.meta.get("class_names")
        pre = self.meta["preprocess"]
        self.patch_size, self.crop_size = pre.get("patch_size"), pre.get("crop_size")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.meta["output_name"]], {self.meta["input_name"]: images.float().cpu().numpy()})
        return torch.from_numpy(out[0]).to(images.device)  # where the caller's tensors are (e.g. slide_inference)

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self  # onnxruntime places the work on its providers' devices

    def predict_config(self) -> dict[str, Any]:
        """The parts of an adapter record that ``ivpt predict`` reads, from the file's metadata."""
        pre = self.meta["preprocess"]
        config = {"task": self.meta["task"], "num_classes": self.num_classes, "mean": self.meta["mean"],
                  "std": self.meta["std"], "method": self.meta["method"], "loaded_from": str(self.path),
                  "adapter_sha256": self.meta["adapter_sha256"]}
        if self.meta["task"] == "segmentation":
            config.update(crop_size=pre["crop_size"], segmentation={"base_size": pre["base_size"]})
        return config
