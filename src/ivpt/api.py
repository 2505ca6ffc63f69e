"""ivpt from Python: train and evaluate with the same engine as the ``ivpt`` command.

    results = ivpt.train(method="vpt-deep", data={"kind": "suite", "task": "clevr-count"}, epochs=5,
                         output="runs/cc")                 # or ivpt.train("recipe.yaml", lr=0.01, ...)
    metrics = ivpt.evaluate("runs/cc/adapter", split="test")

The same checkpoints, resume, lock, preemption and results.json as ``ivpt train`` / ``ivpt eval``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .engine.config import TrainConfig, load_config


def train(config: TrainConfig | dict | str | Path | None = None, *, resume: bool = False, quiet: bool = False,
          **fields) -> dict[str, Any]:
    """Train one method on one dataset and return the run's results (as ``results.json`` holds them).

    config: a TrainConfig, a mapping of its fields, or a YAML recipe; ``fields`` override it
    (e.g. ``method="vpt-deep"``, ``epochs=5``, ``data={"kind": "folder", "root": "photos/"}``).
    """
    from .engine.loop import train as run
    from .engine.pruning import warn_single_run

    if isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **fields)
    elif isinstance(config, dict):
        cfg = TrainConfig(**{**config, **fields})
    else:  # a recipe (or none): the fields join it before it is checked, as --set overrides do
        cfg = load_config(config, fields=fields)
    warn_single_run(cfg)
    return run(cfg, resume=resume, quiet=quiet)


def load_for_inference(adapter_dir, weights=None):
    from .adapter import load_adapter, read_adapter_config
    from .hub import pinned_name, resolve_adapter

    folder = resolve_adapter(adapter_dir)  # hf-hub:org/name[@revision] or a folder
    # without weights, the adapter's recorded backbone weights are used
    config = read_adapter_config(folder)
    config["loaded_from"] = pinned_name(adapter_dir, folder)  # outputs record the exact Hub commit read
    return load_adapter(folder, weights=weights), config


def data_for(model, config: dict, spec: dict):
    """The dataset of an adapter's task, built as its training run built it."""
    from .engine.data import build_task_data
    from .engine.segdata import build_segmentation_data

    if config.get("task") == "segmentation":
        cfg = TrainConfig(task="segmentation", data=spec, segmentation=config.get("segmentation") or
                          {"crop_size": config["crop_size"], "decoder": config["decoder"]})
        return build_segmentation_data(cfg, model.encoder.backbone.pretrained_cfg, model.patch_size)
    from .backbone import input_config

    return build_task_data(spec, input_config(model.backbone))


def inference_device(device: str, precision: str, field: str = "precision"):
    """(device, Precision) for eval and predict: the device claimed (an indexed GPU made current), the
    precision resolved on it; both refused with the flag's name before an adapter or image is read."""
    from .engine.hardware import resolve_precision
    from .engine.loop import claim_device, resolve_device

    where = claim_device(resolve_device(device))
    return where, resolve_precision(precision, where, field=field)


def evaluate(adapter, split: str = "test", data: dict | None = None, *, weights=None, batch_size: int = 256,
             device: str = "auto", multiscale=None, strict: bool = False, compile: bool | str = False,
             precision: str = "fp32") -> dict[str, Any]:
    """Metrics of a saved adapter on a split of its dataset (or of ``data``), as ``ivpt eval`` computes them.

    compile: torch.compile the model first (true or a mode), as the recipe field does for training.
    precision: fp32 (default: the same numbers on every machine), auto, bf16 or fp16 autocast."""
    return evaluate_adapter(str(adapter), split, data, weights, batch_size, device, multiscale, strict, compile,
                            precision)


def evaluate_adapter(adapter: str, split: str, data, weights, batch_size: int, device: str, multiscale,
                     strict: bool, compile: bool | str = False, precision: str = "fp32") -> dict[str, Any]:
    from .engine.data import split_of
    from .engine.distributed import Dist
    from .data.datasets import DataError
    from .engine.loop import compile_model, evaluate as run_evaluation, input_cache, loader_for
    from .engine.tasks import TASKS

    from .backbone import input_config
    from .data.folder import class_difference
    from .data.paths import absolute_path
    from .engine.data import adapter_folder_reading, check_data_spec, check_same_splits

    if multiscale and len(set(multiscale)) != len(multiscale):  # a repeat would weigh twice in the mean, unsaid
        raise ValueError(f"--multiscale {' '.join(map(str, multiscale))}: a scale is listed twice; list each once")
    device, computed_in = inference_device(device, precision)  # first: a wrong value is named before any reading
    model, config = load_for_inference(adapter, weights)
    spec = check_data_spec(data) if data else config.get("data")
    recorded = config.get("data") or {}
    if spec and spec.get("kind") == "folder" == recorded.get("kind"):
        # the adapter's own folder, or new images: its own input pipeline and image reading (as ivpt predict
        # uses them), unless the spec asks otherwise
        spec = {**adapter_folder_reading(recorded, input_config(model.backbone)), **spec}
    if not spec:
        raise ValueError(f"{adapter} records no dataset; pass data={{\"kind\": ..., ...}} (--data on the command line)")
    if data:  # resolved as a run resolves its paths
        spec = {**spec, **{k: absolute_path(spec[k]) for k in ("root", "path") if isinstance(spec.get(k), str)}}
    task, spec, own_folder, redrawn = _own_folder_task(model, config, spec, bool(data))
    if own_folder:  # the adapter's own folder: its held-out splits must be the ones it was trained beside
        check_same_splits(config.get("data_splits"), task, f"{adapter} (data root {spec.get('root')})", redrawn)
    if model.class_names and task.classes != model.class_names:
        raise ValueError(f"the dataset's classes differ from the adapter's: {class_difference(model.class_names, task.classes, 'the adapter')}; "
                         "is this the dataset the adapter was trained on?")
    kind = config.get("task", "classification")
    impl = TASKS[kind]()
    impl.ignore_index = getattr(task, "ignore_index", None)
    if multiscale is not None:
        if kind != "segmentation":
            raise ValueError(f"--multiscale applies to segmentation adapters; {adapter} is {kind}")
        from .segmentation import MS_SCALES

        multiscale = list(multiscale or MS_SCALES)
        impl.multiscale = tuple(multiscale)
    batch = impl.eval_batch(batch_size)
    dataset = split_of(task, split)
    try:
        dataset = input_cache(dataset, "auto", device)  # decoded once (ivpt.data.cache); the same numbers
    except DataError as err:
        if strict:
            raise
        print(f"warning: not using the tensor cache ({err}); reading the images one by one", file=sys.stderr)
    if not strict:  # unreadable images are skipped with a warning each and listed in the output
        from .data.datasets import SkipUnreadable, collate_readable

        dataset = SkipUnreadable(dataset)
    loader = loader_for(dataset, batch, Dist(), 0, False, 0, None if strict else collate_readable)
    metrics = run_evaluation(compile_model(model.to(device), compile), loader, len(task.classes), device,
                             precision=computed_in.used, desc=split, task=impl)
    skipped = [] if strict else [_named(dataset.dataset, s) for s in dataset.skipped]
    metrics.update({"adapter": adapter, "adapter_revision": config["loaded_from"], "split": split, "data": spec,
                    "classes": task.classes, "scales": multiscale, "skipped": skipped,
                    "device": str(device), "precision": computed_in.to_dict()})
    return metrics


def _own_folder_task(model, config: dict, spec: dict, given: bool):
    """(task data, the spec it was built from, whether it is the adapter's own folder, the holdout fields a
    --data spec redraws).

    A folder is the adapter's own when no --data is given, when --data names the recorded root, or when
    its content is the one recorded (the folder moved: its splits, drawn as training drew them, hold the
    recorded images); then its held-out splits are drawn as training drew them, never anew."""
    from .data.datasets import DataError
    from .data.paths import absolute_path
    from .engine.data import FOLDER_DEFAULTS, split_record

    recorded = config.get("data") or {}
    if not (spec.get("kind") == "folder" == recorded.get("kind")):
        return data_for(model, config, spec), spec, not given, []
    # the holdout fields the adapter records (the rest were the defaults then); no rule recorded: rule 1
    as_trained = {**{k: v for k, v in spec.items() if k not in FOLDER_DEFAULTS},
                  **{k: recorded[k] for k in FOLDER_DEFAULTS if k in recorded},
                  "holdout_rule": recorded.get("holdout_rule", FOLDER_DEFAULTS["holdout_rule"])}
    if not given:
        return data_for(model, config, as_trained), as_trained, True, []
    asked = {k: spec[k] for k in FOLDER_DEFAULTS if k in spec}
    redrawn = [f"{k} {v} (trained with {recorded.get(k, FOLDER_DEFAULTS[k])})" for k, v in asked.items()
               if v != recorded.get(k, FOLDER_DEFAULTS[k])]
    same_path = bool(recorded.get("root")) and spec["root"] == absolute_path(recorded["root"])
    trained_splits = None
    if same_path:
        trained_splits = data_for(model, config, as_trained)
    elif config.get("data_splits") and _class_folders(spec["root"]) == set(model.class_names or ()):
        try:  # drawn as training drew them, does this folder give the recorded splits?
            trained_splits = data_for(model, config, as_trained)
        except DataError:  # the recorded fields do not even apply to it (e.g. it has a val/ folder): another one
            trained_splits = None
    moved = (not same_path and trained_splits is not None
             and split_record(trained_splits) == config.get("data_splits"))
    if not (same_path or moved):
        return data_for(model, config, spec), spec, False, []  # images of their own: drawn as the spec says
    if redrawn:
        return data_for(model, config, {**as_trained, **asked}), {**as_trained, **asked}, True, redrawn
    return trained_splits, as_trained, True, []


def _class_folders(root) -> set[str]:
    """The visible subfolder names of a flat image folder (its classes), cheaply: no file is read."""
    from .data.datasets import hidden

    root = Path(root)
    root = root / "train" if (root / "train").is_dir() else root  # split folders: the classes are train's
    return {p.name for p in root.iterdir() if p.is_dir() and not hidden(p.name)} if root.is_dir() else set()


def _named(dataset, skipped: dict) -> dict:
    """A skipped item with its file, where the dataset lists files."""
    items = getattr(dataset, "items", None)
    if items is not None and getattr(dataset, "root", None) is not None:
        return {"image": str(Path(dataset.root) / items[skipped["index"]][0]), **skipped}
    return skipped


# -- the protocol over the offline suite -------------------------------------------------------------
def tune_suite(config: TrainConfig, tasks: list[str], output, **options) -> dict[str, Any]:
    """VPT's protocol (``ivpt.engine.study.tune``) on each offline-suite task of ``tasks``, one folder each
    under ``output``; the per-task summaries and the suite means, also written to suite_summary.json.
    ``options``: the study's (storage, workers, pruner, heartbeat, devices)."""
    from .data.suite import summarize
    from .engine.checkpoint import atomic_write
    from .engine.study import tune

    out = Path(output)
    summaries = {task: tune(dataclasses.replace(config, data={**config.data, "task": task}), out / task, **options)
                 for task in tasks}
    means = summarize({t: s["test_mean"] for t, s in summaries.items()})
    merged = {"method": config.method, "tasks": summaries, **means}
    atomic_write(out / "suite_summary.json", lambda tmp: tmp.write_text(json.dumps(merged, indent=2)))
    return merged


# -- predictions on image files ----------------------------------------------------------------------
def image_files(items: list[str]) -> list[Path]:
    """The image files named, folders expanded (formats ivpt cannot read are listed too, so that they are
    reported as skipped)."""
    from .data.datasets import IMAGE_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES, visible_files

    files = []
    for item in map(Path, items):
        if item.is_dir():
            files += [f for f in visible_files(item) if f.suffix.lower() in IMAGE_SUFFIXES + UNREADABLE_IMAGE_SUFFIXES]
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no image or folder at {item}")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(items)}")
    return files


def read_images(files: list[Path], strict: bool, transform=None, upright: bool = True):
    """(file, image) for every readable file; unreadable ones warned about and returned apart, or raised."""
    from .data.datasets import DataError, open_rgb

    readable, skipped = [], []
    for f in files:
        try:
            image = open_rgb(f, upright)
            readable.append((f, transform(image) if transform else image))
        except DataError as err:
            if strict:
                raise
            print(f"warning: skipped: {err}", file=sys.stderr, flush=True)
            skipped.append({"image": str(f), "error": str(err)})
    return readable, skipped


def readable_batches(files: list[Path], batch_size: int, strict: bool, transform, upright: bool, skipped: list):
    """(files, image batch) per ``batch_size`` of readable images, read as the adapter's run read its own
    (``upright``: turned by their EXIF orientation); unreadable ones go to ``skipped`` (or raise, if strict)."""
    import torch

    for start in range(0, len(files), batch_size):
        readable, unreadable = read_images(files[start:start + batch_size], strict, transform, upright)
        skipped += unreadable
        if readable:
            yield [f for f, _ in readable], torch.stack([x for _, x in readable])


def predict_labels(model, files: list[Path], preprocess: dict, class_names: list[str], top_k: int, *,
                   batch_size: int = 64, strict: bool = False, device=None, precision: str = "fp32"):
    """(predictions, skipped): the ``top_k`` labels with scores per readable image, read through the adapter's
    ``preprocess`` description (``ivpt.deploy.preprocess_of``); ``model`` a loaded adapter or an OnnxModel."""
    import torch

    from .deploy import transform_of
    from .engine.loop import autocast_for

    device = device or torch.device("cpu")
    transform, k = transform_of(preprocess), min(top_k, len(class_names))
    predictions, skipped = [], []
    with torch.no_grad():
        for chunk, batch in readable_batches(files, batch_size, strict, transform, preprocess["exif_orientation"],
                                             skipped):
            with autocast_for(precision, device):
                logits = model(batch.to(device))
            scores, index = logits.float().softmax(-1).topk(k, dim=-1)
            for f, s, i in zip(chunk, scores.tolist(), index.tolist()):
                predictions.append({"image": str(f), "top_k": [{"label": class_names[j], "score": round(p, 5)}
                                                              for p, j in zip(s, i)]})
    return predictions, skipped


def predict_masks(model, config: dict, files: list[Path], out, *, strict: bool = False, device=None,
                  precision: str = "fp32", on_mask=None) -> list[dict]:
    """Segmentation: a colour-coded mask and an overlay PNG per image in ``out``, plus the class legend
    (legend.json); returns the unreadable images skipped (also in skipped.json). ``on_mask(image, mask_path)``
    is called as each mask is written."""
    import numpy as np
    import torch
    from PIL import Image

    from .engine.checkpoint import atomic_write
    from .palette import palette

    out = Path(out)
    _refuse_repeated_stems(files, out)
    colours = np.array(palette(model.num_classes), dtype=np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    readable, skipped = read_images(files, strict)
    for f, image in readable:
        labels = mask_of(model, config, image, device or torch.device("cpu"), precision)
        mask = Image.fromarray(colours[labels])
        mask.save(out / f"{f.stem}_mask.png")
        Image.blend(image, mask, 0.5).save(out / f"{f.stem}_overlay.png")
        if on_mask is not None:
            on_mask(f, out / f"{f.stem}_mask.png")
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    legend = json.dumps({n: list(map(int, c)) for n, c in zip(names, colours)}, indent=2)
    atomic_write(out / "legend.json", lambda tmp: tmp.write_text(legend))
    if skipped:
        atomic_write(out / "skipped.json", lambda tmp: tmp.write_text(json.dumps(skipped, indent=2)))
    return skipped


def _refuse_repeated_stems(files: list[Path], out: Path) -> None:
    """Masks are named by the image's stem: two alike would overwrite each other."""
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{stems[f.stem]} and {f} would both write {out / (f.stem + '_mask.png')}; predict them "
                             "in separate runs (other --output folders) or rename one (nothing was written)")
        stems[f.stem] = f


def mask_of(model, config: dict, image, device, precision: str = "fp32"):
    """(H, W) class indices for a PIL image at its own size: rescaled as the adapter's training and evaluation
    rescaled, slid over in crop-size windows."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data.segmentation import SegEvalTransform
    from .engine.loop import autocast_for
    from .engine.segdata import base_size
    from .segmentation import slide_inference

    crop = int(config["crop_size"])
    base = base_size(config.get("segmentation") or {}, (config.get("data") or {}).get("kind"), crop)
    transform = SegEvalTransform(base, tuple(config["mean"]), tuple(config["std"]), model.patch_size)
    x, _ = transform(image, np.zeros((image.size[1], image.size[0]), dtype=np.uint8))
    with torch.no_grad(), autocast_for(precision, device):
        logits = slide_inference(model, x[None].to(device)).float()
    return F.interpolate(logits, size=(image.size[1], image.size[0]), mode="bilinear",
                         align_corners=False).argmax(1)[0].cpu().numpy()
