"""Model cards: the README.md of every adapter folder, written from what the adapter records.

Nothing in a card is typed by hand: method and options, backbone and weight source, the tuned
tensors (counted from their shapes), data and splits, the recipe and command that trained it, the
metrics the training run recorded (and, for a protocol run, every seed's test score), the library
version, and the YAML block the Hugging Face Hub reads (library name, tags, metrics).
"""
from __future__ import annotations

import json
import math
from typing import Any

import yaml

CARD_FILE = "README.md"
STATISTICS = (".running_mean", ".running_var", ".num_batches_tracked")


def _count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def parameter_rows(config: dict[str, Any]) -> list[tuple[str, int]]:
    """Tuned tensors grouped by owner: the head, the method's components, backbone tensors tuned in place."""
    groups: dict[str, int] = {}
    head_names = ("backbone.head.", "decoder.", "head.")
    for name, shape in (config.get("tensors") or {}).items():
        if name.endswith(STATISTICS):  # BatchNorm's running statistics are stored, not tuned
            continue
        name = name.removeprefix("encoder.")  # a segmentation model's encoder: named as a classifier's
        if name.startswith(head_names):
            group = "head" if not name.startswith("decoder.") else "decoder"
        elif name.startswith("method."):
            group = name.split(".")[1]
        else:
            group = "backbone (in place)" if config.get("method") != "full" else "backbone"
        groups[group] = groups.get(group, 0) + _count(shape)
    return sorted(groups.items())


def _metric_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    metrics = config.get("metrics") or {}
    kind = "mean_iou" if config.get("task") == "segmentation" else "accuracy"
    return [{"type": kind, "name": f"{split} {'mIoU' if kind == 'mean_iou' else 'top-1'}", "value": value}
            for split, value in metrics.items() if isinstance(value, (int, float))]


def as_typed(training: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config with its path fields as the user typed them (the run records them absolute,
    which tells a card's reader only where they were on the training machine)."""
    typed = training.get("paths_as_typed") or {}
    shown = {k: v for k, v in training.items() if k != "paths_as_typed"}
    for key, value in typed.items():
        if key.startswith("data.") and isinstance(shown.get("data"), dict):
            shown["data"] = {**shown["data"], key[5:]: value}
        elif key in shown:
            shown[key] = value
    return shown


def model_card(config: dict[str, Any], protocol: dict[str, Any] | None = None) -> str:
    """The card's text. protocol: an ``ivpt tune`` summary (chosen lr/wd, per-seed test scores), if any."""
    method = config.get("method", "?")
    backbone = config.get("backbone") or {}
    name = backbone.get("name") or "a timm VisionTransformer"
    typed = (config.get("training_config") or {}).get("paths_as_typed") or {}
    data = {**(config.get("data") or {}), **{k[5:]: v for k, v in typed.items() if k.startswith("data.")}}
    task = config.get("task", "classification")
    tags = ["ivpt", "timm", "parameter-efficient-fine-tuning", method,
            "image-segmentation" if task == "segmentation" else "image-classification"]
    if method in ("vpt-shallow", "vpt-deep", "gatevpt", "vfpt", "e2vpt", "ivpt", "ivpt-static"):
        tags.append("visual-prompt-tuning")
    meta: dict[str, Any] = {"library_name": "ivpt", "tags": tags, "pipeline_tag": tags[4]}
    dataset_name = data.get("task") or data.get("dataset") or data.get("root") or data.get("kind") or "unknown"
    entries = _metric_entries(config)
    if protocol and protocol.get("test_mean") is not None:
        entries.append({"type": entries[0]["type"] if entries else "accuracy",
                        "name": f"test mean over {len(protocol.get('seeds') or [])} seeds", "value": protocol["test_mean"]})
    if entries:
        meta["model-index"] = [{"name": f"{method}-{name}", "results": [{
            "task": {"type": tags[4]}, "dataset": {"name": str(dataset_name), "type": str(data.get("kind", "unknown"))},
            "metrics": entries}]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {method} adapter for {name}", "",
             f"A `{method}` adapter trained with ivpt {config.get('ivpt_version', '')}: only the "
             "tensors below were trained; the backbone's own weights are loaded separately.", "",
             "```python", "import ivpt", "model = ivpt.load_adapter(\"hf-hub:ORG/NAME\")  # or a local folder", "```", "",
             "## Method", "", f"- method: `{method}`",
             f"- options: `{json.dumps(config.get('options') or {}, sort_keys=True)}`", "",
             "## Backbone", "", f"- name: `{name}`", f"- weights: {backbone.get('weights_source', 'unknown')}"
             + (f" (`{backbone['weights_file']}`)" if backbone.get("weights_file") else ""),
             (f"- frozen weights sha256 (every backbone tensor the adapter leaves as it is): "
              f"`{backbone['frozen_weights_sha256']}`" if backbone.get("frozen_weights_sha256") else
              f"- weights fingerprint (sha256 of patch and position embeddings): `{backbone.get('weights_fingerprint')}`"),
             f"- input: {config.get('image_size')} px, mean {config.get('mean')}, std {config.get('std')}", "",
             "## Tuned parameters", "", "| part | parameters |", "|---|---|"]
    rows = parameter_rows(config)
    lines += [f"| {group} | {count:,} |" for group, count in rows]
    lines += [f"| total | {sum(c for _, c in rows):,} |", "", "## Data", "",
              f"- dataset: `{json.dumps(data, sort_keys=True)}`",
              f"- classes: {config.get('num_classes')}" + (f" ({', '.join(map(str, config['class_names'][:20]))}"
                                                          f"{', ...' if len(config['class_names']) > 20 else ''})"
                                                          if config.get("class_names") else "")]
    training = as_typed(config.get("training_config") or {})
    if training:
        lines.append(f"- splits: trained on `{training.get('train_split')}`, evaluated on "
                     f"`{training.get('eval_split')}`" + (f" and `{training['test_split']}`"
                                                         if training.get("test_split") else ""))
    lines += ["", "## Results", ""]
    if entries:
        lines += ["| metric | value |", "|---|---|"] + [f"| {e['name']} | {e['value']:.4f} |" for e in entries]
    else:
        lines.append("No metrics were recorded with this adapter.")
    if protocol:
        chosen = protocol.get("chosen") or {}
        pairs = zip(protocol.get("seeds") or [], protocol.get("test_top1") or [])
        lines += ["", f"VPT protocol (`ivpt tune`): lr {chosen.get('lr')}, weight decay {chosen.get('weight_decay')} "
                  "chosen on val; test per seed: " + ", ".join(f"{seed}: {score:.4f}" for seed, score in pairs)
                  + f"; mean {protocol['test_mean']:.4f} +- {protocol.get('test_std', 0.0):.4f}"]
    if training or config.get("command"):
        lines += ["", "## How it was trained", ""]
        if config.get("command"):
            lines += ["```bash", config["command"], "```", ""]
        if training:
            lines += ["The effective recipe (`ivpt train recipe.yaml` reproduces the run):", "", "```yaml",
                      yaml.safe_dump(training, sort_keys=True).rstrip(), "```"]
    lines += ["", f"Written by ivpt {config.get('ivpt_version', '')} from the adapter's own record.", ""]
    return "\n".join(lines)


def read_card_metadata(text: str) -> dict[str, Any]:
    """The YAML block at the top of a card."""
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
