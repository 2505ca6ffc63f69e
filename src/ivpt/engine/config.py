"""Run configuration: a YAML recipe plus command-line overrides, validated field by field."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..options import OptionError, check_bool, check_choice, check_float, check_int


class ConfigError(ValueError):
    """A recipe or override names an unknown field or gives it a value it does not accept."""


@dataclass
class TrainConfig:
    task: str = "classification"     # classification | segmentation
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
    train_split: str = "train"       # train | trainval
    eval_split: str = "val"          # val | test | none: evaluated every eval_every epochs and after the last
    eval_every: int = 1              # 0: only after the last epoch (segmentation evaluation is costly)
    test_split: str | None = None     # evaluated once at the end (e.g. test), if given
    # optimisation (VPT: SGD momentum 0.9, cosine, warm-up)
    optimizer: str = "sgd"
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
    schedule: str = "cosine"         # cosine | poly (power 0.9, as segmentation recipes use)
    # segmentation only: decoder (linear|naive|pup), crop_size, decoder_channels, base_size, ratio_range
    segmentation: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"          # auto | fp32 | bf16 | fp16 (fp16 on CUDA only); auto: see engine/hardware.py
    seed: int = 42
    device: str = "auto"
    workers: int | str = "auto"      # loader processes; auto: none on CPU or for cached splits, else a core share
    cache: str = "auto"              # auto: decode deterministic splits once (ivpt.data.cache); off; device
    threads: int | None = None       # torch CPU threads of this process (None: a share of the cores, see docs)
    checkpoint_every_steps: int = 0  # also checkpoint inside epochs (a SIGKILL then loses at most this many steps)
    # torch.compile the model: true, a mode (default, reduce-overhead, max-autotune...) or {mode: ..., backend: ...}
    compile: bool | str | dict = False
    output: str = "runs/default"
    # used by `ivpt tune` only: the lr x wd grid and the seeds of the final runs (VPT's protocol)
    protocol: dict[str, Any] = field(default_factory=dict)
    # set by ivpt when a run starts: the path fields as typed (the resolved ones are recorded), for the model card
    paths_as_typed: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        import torch  # here, not at import: `ivpt train --help` lists the fields without loading torch

        from ..backbones import DEFAULT_BACKBONE, is_shipped
        from ..data.datasets import DataError
        from .data import check_data_spec

        # YAML 1.1 reads 1e-3 (no dot) as a string: accept numeric strings for number fields
        for name in ("lr", "weight_decay", "momentum", "label_smoothing", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    pass  # reported below, naming the field
        checks = [
            lambda: check_choice("task", self.task, ("classification", "segmentation")),
            lambda: check_choice("schedule", self.schedule, ("cosine", "poly")),
            lambda: check_choice("train_split", self.train_split, ("train", "trainval")),
            lambda: check_choice("eval_split", self.eval_split, ("val", "test", "none")),
            lambda: self.test_split is None or check_choice("test_split", self.test_split, ("val", "test")),
            lambda: check_choice("optimizer", self.optimizer, ("sgd", "adamw")),
            lambda: check_float("lr", self.lr, 0.0, None, low_open=True),
            lambda: check_bool("lr_scaling", self.lr_scaling),
            lambda: check_float("weight_decay", self.weight_decay, 0.0),
            lambda: check_float("momentum", self.momentum, 0.0, 1.0, high_open=True),
            lambda: check_int("epochs", self.epochs, low=1),
            lambda: check_int("warmup_epochs", self.warmup_epochs, low=0),
            lambda: check_int("eval_every", self.eval_every, low=0),
            lambda: check_int("batch_size", self.batch_size, low=1),
            lambda: check_int("accumulation", self.accumulation, low=1),
            lambda: check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True),
            lambda: self.grad_clip is None or check_float("grad_clip", self.grad_clip, 0.0, None, low_open=True),
            lambda: check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16")),
            lambda: self.threads is None or check_int("threads", self.threads, low=1),
            lambda: check_int("checkpoint_every_steps", self.checkpoint_every_steps, low=0),
            lambda: check_compile(self.compile),
            lambda: check_int("seed", self.seed, low=0),
            lambda: self.workers == "auto" or check_int("workers", self.workers, low=0),
            lambda: check_choice("cache", self.cache, ("auto", "off", "device")),
        ]
        for check in checks:
            try:
                check()
            except OptionError as err:
                raise ConfigError(str(err).replace("option ", "config field ", 1)) from None
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:  # short runs work: the warm-up shrinks
            warnings.warn(f"warmup_epochs {self.warmup_epochs} is not below epochs {self.epochs}: using "
                          f"{self.epochs - 1} warm-up epoch(s)", stacklevel=2)
            self.warmup_epochs = self.epochs - 1
        for name, value, optional in (("output", self.output, False), ("weights", self.weights, True)):
            if not (isinstance(value, (str, os.PathLike)) and str(value)) and not (optional and value is None):
                raise ConfigError(f"config field {name!r}: got {value!r}, expected a path"
                                  + (" or null" if optional else "") + " (quote it in YAML if it reads as a number)")
        if self.pretrained is not None and not isinstance(self.pretrained, bool):
            raise ConfigError(f"config field 'pretrained': got {self.pretrained!r}, expected true, false or null")
        if self.pretrained is None and not self.weights and self.method != "full" and not is_shipped(self.backbone):
            raise ConfigError(
                f"config field 'backbone': {self.backbone!r} gets no pretrained weights, and prompt tuning a "
                "randomly initialised ViT is meaningless. Pass weights=FILE (.safetensors, .pth/.bin state dict or "
                "Google .npz), pretrained=true (timm's hub), or a shipped backbone such as "
                f"{DEFAULT_BACKBONE!r}; set pretrained=false to train on random weights on purpose")
        try:
            self.data = check_data_spec(self.data)
        except DataError as err:
            raise ConfigError(f"config field 'data': {err}") from None
        if not (self.device in ("auto", "cpu", "mps") or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"config field 'device': got {self.device!r}, expected auto, cpu, cuda, cuda:N or mps")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"config field 'device': {self.device!r} asked for, but no CUDA device is available")
        for key, values in self.protocol.items():
            numbers = key != "seeds"
            if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and (numbers or isinstance(v, int))
                    for v in values):
                kind = "integers" if key == "seeds" else "numbers"
                raise ConfigError(f"config field 'protocol.{key}': expected a non-empty list of {kind}, got {values!r}")
            if len({float(v) for v in values}) != len(values):  # a repeat would collapse into one run, unsaid
                raise ConfigError(f"config field 'protocol.{key}': {values!r} repeats a value; list each once")
        if self.batch_size % self.accumulation:
            raise ConfigError(f"config field 'accumulation': {self.accumulation} must divide batch_size ({self.batch_size})")
        if not isinstance(self.protocol, dict) or set(self.protocol) - {"lrs", "wds", "seeds"}:
            raise ConfigError("config field 'protocol': expected a mapping with lrs, wds and seeds lists")
        if not isinstance(self.segmentation, dict) or set(self.segmentation) - {
                "decoder", "crop_size", "decoder_channels", "base_size", "ratio_range"}:
            raise ConfigError("config field 'segmentation': expected a mapping with decoder, crop_size, "
                              "decoder_channels, base_size, ratio_range")
        check_segmentation_options(self.segmentation)
        if not isinstance(self.backbone_options, dict):
            raise ConfigError("config field 'backbone_options': expected a mapping of timm.create_model arguments")
        if not isinstance(self.method_options, dict):
            raise ConfigError("config field 'method_options': expected a mapping of option names to values")
        from ..factory import method_class
        from ..options import config_from_options

        try:  # method and its options checked now, before any data or weights are loaded
            config_from_options(method_class(self.method).config_class, self.method, self.method_options)
        except OptionError as err:
            raise ConfigError(f"config field 'method'/'method_options': {err}") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# the fields that do not change a run's result: where it is written, how it is fed and what it records
NOT_RESULT_FIELDS = ("output", "device", "workers", "eval_every", "threads", "compile", "cache", "paths_as_typed")
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
