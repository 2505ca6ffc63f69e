"""Run configuration: a YAML recipe plus command-line overrides, validated field by field."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..options import OptionError, check_bool, check_choice, check_float, check_int


class ConfigError(ValueError):
    """A recipe or override names an unknown field or gives it a value it does not accept."""


CHANGES_RESULT = "changes_result"  # field metadata key: False where a field changes where or how, not what


def run_setting(default=dataclasses.MISSING, **kwargs):
    """A field that does not change a run's result (where it is written, how it is fed, what it records):
    a resumed run may change it, and the study leaves it out of its key."""
    return field(default=default, metadata={CHANGES_RESULT: False}, **kwargs)


@dataclass
class TrainConfig:
    """One run's recipe. The choice fields' allowed values are their ``Literal`` types (checked by
    ``validate``); ``run_setting`` marks the fields that do not change the result."""

    task: Literal["classification", "segmentation"] = "classification"
    # what to tune
    backbone: str = "vit_mini_patch4_32.ivpt_cifar10"
    weights: str | None = None
    # timm's pretrained weights (its hub); None: only a shipped backbone or a weights file gives weights, and a
    # run without any is refused (but for 'full'); false: train on random weights on purpose
    pretrained: bool | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs (img_size, ...)
    method: str = "ivpt"
    method_options: dict[str, Any] = field(default_factory=dict)
    # data: {"kind": suite|vtab|fgvc|folder|cifar10, ...}; see ivpt.engine.data
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "suite", "task": "clevr-count"})
    train_split: Literal["train", "trainval"] = "train"
    # evaluated every eval_every epochs and after the last
    eval_split: Literal["val", "test", "none"] = "val"
    eval_every: int = run_setting(1)  # 0: only after the last epoch (segmentation evaluation is costly)
    test_split: Literal["val", "test"] | None = None  # evaluated once at the end (e.g. test), if given
    # optimisation (VPT: SGD momentum 0.9, cosine, warm-up)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1                  # base learning rate, scaled by batch_size / 256 when lr_scaling
    lr_scaling: bool = True
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 128            # global batch (all processes, all accumulation steps)
    accumulation: int = 1
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    schedule: Literal["cosine", "poly"] = "cosine"  # poly: power 0.9, as segmentation recipes use
    # segmentation only: decoder (linear|naive|pup), crop_size, decoder_channels, base_size, ratio_range
    segmentation: dict[str, Any] = field(default_factory=dict)
    # auto | fp32 | bf16 | fp16 (fp16 on CUDA only); auto: see engine/hardware.py
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    seed: int = 42
    device: str = run_setting("auto")
    # loader processes; auto: none on CPU or for cached splits, else a core share
    workers: int | Literal["auto"] = run_setting("auto")
    # auto: decode deterministic splits once (ivpt.data.cache); off; device
    cache: Literal["auto", "off", "device"] = run_setting("auto")
    threads: int | None = run_setting(None)  # torch CPU threads of this process (None: a share of the cores)
    checkpoint_every_steps: int = 0  # also checkpoint inside epochs (a SIGKILL then loses at most this many steps)
    # torch.compile the model: true, a mode (default, reduce-overhead, max-autotune...) or {mode: ..., backend: ...}
    compile: bool | str | dict = run_setting(False)
    output: str = run_setting("runs/default")
    # used by `ivpt tune` only: the lr x wd grid and the seeds of the final runs (VPT's protocol); for e2vpt with
    # prune, prune_percents: the pruning levels (default 10, 20, ..., 90, as E2VPT's code)
    protocol: dict[str, Any] = field(default_factory=dict)
    # set by ivpt when a run starts: the path fields as typed (the resolved ones are recorded), for the model card
    paths_as_typed: dict[str, str] = run_setting(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """This config checked field by field (a ConfigError names the first wrong one), returned normalised
        as a new config: numbers given as text read as numbers, the warm-up shortened to fit, the data spec
        spelt out. ``self`` is left as it was."""
        cfg = dataclasses.replace(self, **_numbers_from_text(self))
        _check_values(cfg)
        cfg = dataclasses.replace(cfg, warmup_epochs=_warmup_that_fits(cfg))
        _check_paths(cfg)
        _check_weights_source(cfg)
        cfg = dataclasses.replace(cfg, data=_checked_data(cfg.data))
        for check in (_check_device, _check_protocol, _check_mappings, _check_method):
            check(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# the fields that do not change a run's result: where it is written, how it is fed and what it records
NOT_RESULT_FIELDS = tuple(name for name, f in FIELDS.items() if not f.metadata.get(CHANGES_RESULT, True))


def _literal_values(hint) -> tuple | None:
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    literal = [m for m in members if typing.get_origin(m) is Literal]
    return typing.get_args(literal[0]) if literal else None


# field -> the values it accepts, read from its Literal type (the one place they are written)
CHOICES = {name: values for name, hint in typing.get_type_hints(TrainConfig).items()
           if (values := _literal_values(hint)) is not None}


def _numbers_from_text(cfg: TrainConfig) -> dict[str, float]:
    """YAML 1.1 reads 1e-3 (no dot) as a string: numeric strings of number fields, as numbers (the rest is
    reported by the checks, naming the field)."""
    numbers = {}
    for name in ("lr", "weight_decay", "momentum", "label_smoothing", "grad_clip"):
        value = getattr(cfg, name)
        if isinstance(value, str):
            try:
                numbers[name] = float(value)
            except ValueError:
                pass
    return numbers


def _check_values(cfg: TrainConfig) -> None:
    """The fields that stand alone: choices, ranges and types (the first wrong one named)."""
    try:
        for name, values in CHOICES.items():
            value = getattr(cfg, name)
            if name == "workers":  # a number of processes, or "auto"
                if value != "auto":
                    check_int("workers", value, low=0)
            elif not (name == "test_split" and value is None):
                check_choice(name, value, values)
        check_float("lr", cfg.lr, 0.0, None, low_open=True)
        check_bool("lr_scaling", cfg.lr_scaling)
        check_float("weight_decay", cfg.weight_decay, 0.0)
        check_float("momentum", cfg.momentum, 0.0, 1.0, high_open=True)
        check_int("epochs", cfg.epochs, low=1)
        check_int("warmup_epochs", cfg.warmup_epochs, low=0)
        check_int("eval_every", cfg.eval_every, low=0)
        check_int("batch_size", cfg.batch_size, low=1)
        check_int("accumulation", cfg.accumulation, low=1)
        check_float("label_smoothing", cfg.label_smoothing, 0.0, 1.0, high_open=True)
        if cfg.grad_clip is not None:
            check_float("grad_clip", cfg.grad_clip, 0.0, None, low_open=True)
        if cfg.threads is not None:
            check_int("threads", cfg.threads, low=1)
        check_int("checkpoint_every_steps", cfg.checkpoint_every_steps, low=0)
        check_compile(cfg.compile)
        check_int("seed", cfg.seed, low=0)
    except OptionError as err:
        raise ConfigError(str(err).replace("option ", "config field ", 1)) from None
    if cfg.batch_size % cfg.accumulation:
        raise ConfigError(f"config field 'accumulation': {cfg.accumulation} must divide batch_size ({cfg.batch_size})")


def _check_paths(cfg: TrainConfig) -> None:
    for name, value, optional in (("output", cfg.output, False), ("weights", cfg.weights, True)):
        if not (isinstance(value, (str, os.PathLike)) and str(value)) and not (optional and value is None):
            raise ConfigError(f"config field {name!r}: got {value!r}, expected a path"
                              + (" or null" if optional else "") + " (quote it in YAML if it reads as a number)")


def _check_weights_source(cfg: TrainConfig) -> None:
    """Prompt tuning needs pretrained weights: refuse a run that would get none, unless asked on purpose."""
    from ..backbones import DEFAULT_BACKBONE, is_shipped

    if cfg.pretrained is not None and not isinstance(cfg.pretrained, bool):
        raise ConfigError(f"config field 'pretrained': got {cfg.pretrained!r}, expected true, false or null")
    if cfg.pretrained is None and not cfg.weights and cfg.method != "full" and not is_shipped(cfg.backbone):
        raise ConfigError(
            f"config field 'backbone': {cfg.backbone!r} gets no pretrained weights, and prompt tuning a "
            "randomly initialised ViT is meaningless. Pass weights=FILE (.safetensors, .pth/.bin state dict or "
            "Google .npz), pretrained=true (timm's hub), or a shipped backbone such as "
            f"{DEFAULT_BACKBONE!r}; set pretrained=false to train on random weights on purpose")


def _checked_data(spec) -> dict[str, Any]:
    from ..data.datasets import DataError
    from .data import check_data_spec

    try:
        return check_data_spec(spec)
    except DataError as err:
        raise ConfigError(f"config field 'data': {err}") from None


def _check_device(cfg: TrainConfig) -> None:
    import torch  # here, not at import: `ivpt train --help` lists the fields without loading torch

    device = cfg.device
    if not (device in ("auto", "cpu", "mps", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"config field 'device': got {device!r}, expected auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device': {device!r} asked for, but no CUDA device is available")


def _check_protocol(cfg: TrainConfig) -> None:
    """``protocol``: lrs, wds (numbers) and seeds (integers), each a non-empty list without repeats."""
    if not isinstance(cfg.protocol, dict):
        raise ConfigError("config field 'protocol': expected a mapping with lrs, wds and seeds lists")
    for key, values in cfg.protocol.items():
        numbers = key != "seeds"
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and (numbers or isinstance(v, int))
                for v in values):
            kind = "numbers" if numbers else "integers"
            raise ConfigError(f"config field 'protocol.{key}': expected a non-empty list of {kind}, got {values!r}")
        if len({float(v) for v in values}) != len(values):  # a repeat would collapse into one run, unsaid
            raise ConfigError(f"config field 'protocol.{key}': {values!r} repeats a value; list each once")
    unknown = sorted(set(cfg.protocol) - {"lrs", "wds", "seeds", "prune_percents"})
    if unknown:
        raise ConfigError(f"config field 'protocol.{unknown[0]}': unknown; expected a mapping with lrs, wds and seeds "
                          "lists (and prune_percents for e2vpt with prune)")
    percents = cfg.protocol.get("prune_percents")
    if percents is not None:
        options = cfg.method_options
        # the stage's recipe, or one of its rewinds or seeds (which carry their masks, empty ones included)
        if not (cfg.method == "e2vpt" and (options.get("prune") or "pruned_tokens" in options
                                           or "pruned_pieces" in options)):
            raise ConfigError("config field 'protocol.prune_percents': the levels of E2VPT's pruning, which runs for "
                              "method e2vpt with method_options.prune: true (and its rewinds); drop it or ask for that")
        if not all(0 < v < 100 for v in percents):
            raise ConfigError(f"config field 'protocol.prune_percents': {percents!r}; expected percentages in (0, 100)")


def _check_mappings(cfg: TrainConfig) -> None:
    if not isinstance(cfg.segmentation, dict) or set(cfg.segmentation) - {
            "decoder", "crop_size", "decoder_channels", "base_size", "ratio_range"}:
        raise ConfigError("config field 'segmentation': expected a mapping with decoder, crop_size, "
                          "decoder_channels, base_size, ratio_range")
    check_segmentation_options(cfg.segmentation)
    if not isinstance(cfg.backbone_options, dict):
        raise ConfigError("config field 'backbone_options': expected a mapping of timm.create_model arguments")
    if not isinstance(cfg.method_options, dict):
        raise ConfigError("config field 'method_options': expected a mapping of option names to values")


def _check_method(cfg: TrainConfig) -> None:
    """The method and its options, checked before any data or weights are loaded."""
    from ..factory import method_class
    from ..options import config_from_options

    try:
        config_from_options(method_class(cfg.method).config_class, cfg.method, cfg.method_options)
    except OptionError as err:
        raise ConfigError(f"config field 'method'/'method_options': {err}") from None


def _warmup_that_fits(cfg: TrainConfig) -> int:
    """Short runs work: a warm-up as long as the run shrinks to one epoch less, said in a warning."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        warnings.warn(f"warmup_epochs {cfg.warmup_epochs} is not below epochs {cfg.epochs}: using "
                      f"{cfg.epochs - 1} warm-up epoch(s)", stacklevel=3)
        return cfg.epochs - 1
    return cfg.warmup_epochs


def check_segmentation_options(opts: dict[str, Any]) -> None:
    """The ``segmentation`` field's values: sizes whole and positive, the scale range ordered."""
    from ..segmentation import DECODERS

    def pair(value, kind):
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value)

    if "decoder" in opts and opts["decoder"] not in DECODERS:
        raise ConfigError(f"config field 'segmentation.decoder': got {opts['decoder']!r}, expected one of "
                          f"{', '.join(DECODERS)}")
    for name in ("crop_size", "decoder_channels"):
        if name in opts and (isinstance(opts[name], bool) or not isinstance(opts[name], int) or opts[name] < 1):
            raise ConfigError(f"config field 'segmentation.{name}': got {opts[name]!r}, expected a whole number of "
                              "at least 1")
    if "base_size" in opts and not (pair(opts["base_size"], int) and min(opts["base_size"]) >= 1):
        raise ConfigError(f"config field 'segmentation.base_size': got {opts['base_size']!r}, expected [long side, "
                          "short side] in pixels, e.g. [2048, 512]")
    ratio = opts.get("ratio_range")
    if ratio is not None and not (pair(ratio, (int, float)) and 0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"config field 'segmentation.ratio_range': got {ratio!r}, expected [low, high] scale "
                          "factors with 0 < low <= high, e.g. [0.5, 2.0]")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(value) -> dict[str, str] | None:
    """The ``compile`` field as torch.compile's keyword arguments (None: not compiled)."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, str):
        return {"mode": check_choice("compile", value, COMPILE_MODES)}
    if isinstance(value, dict) and value and set(value) <= {"mode", "backend"}:
        if "mode" in value:
            check_choice("compile.mode", value["mode"], COMPILE_MODES)
        if "backend" in value and not (isinstance(value["backend"], str) and value["backend"]):
            raise OptionError(f"option 'compile.backend': got {value['backend']!r}, expected a torch.compile backend "
                              "name such as inductor, aot_eager or eager")
        return dict(value)
    raise OptionError(f"option 'compile': got {value!r}, expected false, true, one of {', '.join(COMPILE_MODES)}, "
                      "or {mode: ..., backend: ...}")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that repeats a key is refused (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key: PyYAML's own check names it
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(f"{key_node.start_mark.name}: key {key!r} is given twice (lines {first[key]} and "
                                  f"{line}); keep one")
            first[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str) -> Any:
    """A user's YAML text (a recipe, a --set value), duplicate keys refused naming both lines of ``source``."""
    loader = UniqueKeyLoader(text)
    loader.name = source  # what the marks (and so the messages) call the text
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_value(text: str, where: str = "value") -> Any:
    """Command-line values are read as YAML: 0.1, true, null, [1, 2], {a: 1}; text that is not valid YAML
    (an unclosed brace, 'a: b: c') is refused rather than taken as a string that means something else."""
    try:
        return read_yaml(text, where)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: {text!r} is not a valid YAML value ({problem}); close the brackets or quotes, "
                          f"or quote the whole value to mean a string (KEY='\"{text}\"')") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; dotted keys reach into mappings (``data.task=dtd10``). A key given twice with
    different values is refused: which one was meant cannot be told."""
    raw = json.loads(json.dumps(raw))  # deep copy
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value with a field name before '='")
        if key in given and given[key] != value:
            raise ConfigError(f"override {key!r} is given twice ({key}={given[key]} and {item}); give it once")
        given[key] = value
        target, parts = raw, key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        target[parts[-1]] = parse_value(value, f"override {key}")
    return raw


def as_started(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as a run records it when it starts: every path field expanded (``~``) and made absolute against
    the working directory, so that its records name the same files from anywhere (the values as typed go to
    ``paths_as_typed``, for the model card), and a folder's holdout rule spelt out. Idempotent."""
    from ..data.paths import absolute_path
    from .data import HOLDOUT_RULE, is_folder_spec

    typed = dict(cfg.paths_as_typed)
    values = {"weights": cfg.weights, "output": cfg.output, **{f"data.{k}": cfg.data.get(k) for k in ("root", "path")}}
    resolved = {}
    for name, value in values.items():
        if isinstance(value, (str, Path)) and str(value):
            resolved[name] = absolute_path(value)
            if resolved[name] != str(value):
                typed.setdefault(name, str(value))
    data = {**cfg.data, **{k.split(".", 1)[1]: v for k, v in resolved.items() if k.startswith("data.")}}
    if is_folder_spec(data):
        data.setdefault("holdout_rule", HOLDOUT_RULE)
    return dataclasses.replace(cfg, data=data, paths_as_typed=typed,
                               **{k: v for k, v in resolved.items() if k in ("weights", "output")})


def check_inputs(cfg: TrainConfig) -> None:
    """The files and folders a run reads, checked to exist before any weights are downloaded or model built."""
    data = cfg.data
    for name, value, want in (("data.root", data.get("root"), "folder"), ("data.path", data.get("path"), "file or folder"),
                              ("weights", cfg.weights, "file")):
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            where = "" if Path(value).is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise FileNotFoundError(f"config field '{name}': {value} does not exist{where}; expected a {want}"
                                    + (" of images, one subfolder per class" if name == "data.root" and
                                       data.get("kind", "folder") == "folder" else ""))
        if want == "folder" and not path.is_dir():
            raise ConfigError(f"config field '{name}': {value} is a file; expected a folder")
        if want == "file" and path.is_dir() and name == "weights":
            raise ConfigError(f"config field 'weights': {value} is a folder; expected a weights file "
                              "(.safetensors, .pth/.bin state dict or Google .npz)")


def read_recipe(path: Path) -> Any:
    """A recipe file's YAML; anything else (a folder, an image, a missing file) refused saying what it is."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a recipe (a YAML file such as configs/suite/base.yaml). To train "
                          f"on a folder of images (one subfolder per class): ivpt train --set data.root={path}")
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path} (a recipe is a YAML file such as configs/suite/base.yaml; "
                                "`ivpt train --help` lists its fields)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a recipe: it is not UTF-8 text (an image or other binary file?). A recipe "
                          "is a YAML file such as configs/suite/base.yaml; to label images use ivpt predict ADAPTER "
                          "IMAGES; to train on your images, ivpt train --set data.root=FOLDER") from None
    try:
        return read_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def load_config(path: str | Path | list | tuple | None = None, overrides: list[str] | None = None,
                fields: dict[str, Any] | None = None) -> TrainConfig:
    """A recipe (or several: each later file's fields replace the earlier ones', e.g. a dataset's recipe
    then a method's protocol from configs/protocols/), then ``key=value`` overrides, then ``fields``."""
    raw: dict[str, Any] = {}
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for path in map(Path, paths):
        layer = read_recipe(path) or {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        unknown = sorted(set(layer) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config field {unknown[0]!r} in {path}; known fields: {', '.join(FIELDS)}")
        raw.update(layer)
    path = ", ".join(map(str, paths)) or None
    raw = apply_overrides(raw, overrides or [])
    raw.update(fields or {})
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"unknown config field {unknown[0]!r}{where}; known fields: {', '.join(FIELDS)}")
    base = TrainConfig()
    if "data" in raw and isinstance(raw["data"], dict) and not {"kind", "root"} & set(raw["data"]):
        raw["data"] = {**base.data, **raw["data"]}  # e.g. {task: dtd10}: a task of the default suite
    return TrainConfig(**raw).validate()


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The fields that change a run's result in which a saved run's config differs from ``cfg``."""
    saved = result_fields(saved)
    return [k for k, v in result_fields(cfg.to_dict()).items() if saved.get(k) != v]


def result_fields(config: dict) -> dict:
    """The config fields that change a run's result (not where it is written or how it is fed), as a run
    records them today."""
    from ..data.paths import absolute_path
    from .data import is_folder_spec

    normal = json.loads(json.dumps(config))  # tuples and lists compare alike
    data = normal.get("data") if isinstance(normal.get("data"), dict) else {}
    for holder, key in ((normal, "weights"), (data, "root"), (data, "path")):
        if isinstance(holder.get(key), str) and holder[key]:  # runs before 2026-12-06 recorded paths as typed
            holder[key] = absolute_path(holder[key])
    if is_folder_spec(data):
        data.setdefault("holdout_rule", 1)  # runs before 2026-12-06 record none: they drew by rule 1
    return {k: v for k, v in normal.items() if k not in NOT_RESULT_FIELDS}


def resume_hint(saved: dict, diff: list[str]) -> str:
    """What to set so that a run from before the holdout fix resumes with the splits it was drawn with."""
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    if "data" in diff and "root" in data and "holdout_rule" not in data:
        return ("; it was started before 2026-12-06, when held-out splits were drawn by holdout rule 1: add "
                "--set data.holdout_rule=1 to continue it with those splits")
    return ""
