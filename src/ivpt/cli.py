"""The ``ivpt`` command: train, eval, predict, explain, params, tune, quickstart, pretrain, data."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from .cliparse import Parser, one_line_warnings
from .tables import print_table

EXIT_INTERRUPTED = 130
EXIT_SKIPPED = 3  # predict / eval finished, but skipped unreadable images (listed under "skipped")


# -- train ---------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .engine.checkpoint import CheckpointError
    from .engine.config import load_config
    from .engine.loop import train
    from .engine.pruning import warn_single_run

    # --output is a path as typed, never read as YAML (2024 would be a number, '#run' nothing)
    if args.output and any(item.split("=", 1)[0] == "output" for item in args.set or []):
        raise ValueError("the run folder is given twice (--output and --set output=...); give it once")
    cfg = load_config(args.config, list(args.set or []), fields={"output": args.output} if args.output else None)
    if args.restart:
        from .engine.checkpoint import set_aside_run

        moved = set_aside_run(Path(cfg.output).expanduser())
        if moved:
            print(f"--restart: the earlier run's files are now in {moved} (delete that folder once you do not need "
                  "them)", file=sys.stderr)
    warn_single_run(cfg)
    try:
        results = train(cfg, resume=args.resume)
    except CheckpointError as err:  # a damaged or foreign checkpoint: the way out is to start over
        raise CheckpointError(f"{err}; to start this run over, run the same command with --restart instead of "
                              "--resume (the earlier files are moved aside, not deleted)") from None
    metric = results["primary_metric"]
    summary = {k: round(results[k][metric], 4) for k in ("val", "test") if k in results}
    print(json.dumps({"output": cfg.output, metric: summary, "tuned_parameters": results["parameters"]["tuned"]}))
    return 0


# -- eval ----------------------------------------------------------------------------------------
def _load_for_inference(adapter_dir: str, weights: str | None):
    from .api import load_for_inference  # imported when a command runs, not for --help

    return load_for_inference(adapter_dir, weights)


def _json_object(flag: str, text: str | None, example: str) -> dict | None:
    """A command-line JSON object (--data, --options), refused with the flag's name when it is not one."""
    if not text:
        return None
    def unique(pairs):  # json.loads keeps the last of a repeated key without a word
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"{flag} {text!r}: key {repeated[0]!r} is given twice; keep one")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {text!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {text!r}: expected a JSON object of names to values, e.g. {example}")
    return value


def cmd_eval(args) -> int:
    from .api import evaluate_adapter
    from .engine.checkpoint import atomic_write

    data = _json_object("--data", args.data, '\'{"kind": "suite", "task": "dtd10"}\'')
    if args.output:
        _refuse_overwriting_inputs(args.output, args.adapter, None, args.weights, "--output")
    metrics = evaluate_adapter(args.adapter, args.split, data, args.weights, args.batch_size, args.device,
                               args.multiscale, args.strict, args.compile, args.precision)
    skipped = metrics["skipped"]
    primary = "mIoU" if "mIoU" in metrics else "top1"
    print(json.dumps({"split": args.split, primary: round(metrics[primary], 4),
                      **({"scales": metrics["scales"]} if metrics["scales"] else {})}))
    if args.output:
        atomic_write(Path(args.output), lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    return _skipped_exit(skipped)


# -- predict -------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from .api import image_files, inference_device, predict_labels, predict_masks
    from .engine.checkpoint import atomic_write

    device, precision = inference_device(args.device, args.precision, "--precision")
    precision = precision.used
    adapter, images = (args.onnx, args.inputs) if args.onnx else (args.inputs[0], args.inputs[1:])
    if not images:
        raise ValueError("ivpt predict: no images given; expected ivpt predict ADAPTER IMAGES... "
                         "(or ivpt predict --onnx MODEL.onnx IMAGES...)")
    if args.onnx:  # the exported file, run by onnxruntime; the same preprocessing, read from its metadata
        from .deploy import OnnxModel

        if args.weights:
            raise ValueError("--weights with --onnx: an ONNX file holds its backbone's weights; leave --weights out")

        if precision != "fp32":
            raise ValueError(f"--precision {args.precision}: an ONNX file runs in the precision it was exported "
                             "in (fp32); leave --precision out")
        model = OnnxModel(args.onnx, device, fall_back=args.device == "auto")
        device = model.device
        config = model.predict_config()
        preprocess = model.meta["preprocess"]
    else:
        model, config = _load_for_inference(adapter, args.weights)
        model.eval().to(device)
        preprocess = None if config.get("task") == "segmentation" else _preprocess(config, model)
    if args.output and config.get("task") != "segmentation":  # a JSON file; segmentation writes a folder of masks
        _refuse_overwriting_inputs(args.output, adapter, config, args.weights, "--output")
    files = image_files(images)
    if config.get("task") == "segmentation":
        skipped = predict_masks(model, config, files, Path(args.output or "predictions"), strict=args.strict,
                                device=device, precision=precision, on_mask=lambda f, mask: print(f"{f}\t{mask}"))
        return _skipped_exit(skipped)
    names = model.class_names or [str(i) for i in range(config["num_classes"])]
    predictions, skipped = predict_labels(model, files, preprocess, names, args.top_k, batch_size=args.batch_size,
                                          strict=args.strict, device=device, precision=precision)
    for p in predictions:
        print(p["image"] + "\t" + "  ".join(f"{t['label']} {t['score']:.3f}" for t in p["top_k"]))
    if args.output:
        result = {"adapter": adapter, "adapter_revision": config["loaded_from"], "device": str(device),
                  "precision": precision, "predictions": predictions, "skipped": skipped}
        if args.onnx:
            result.update(runtime="onnxruntime", adapter_sha256=config["adapter_sha256"])
        atomic_write(Path(args.output), lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return _skipped_exit(skipped)


def _skipped_exit(skipped: list) -> int:
    if skipped:
        print(f"ivpt: {len(skipped)} unreadable image(s) skipped (--strict stops at the first)", file=sys.stderr)
    return EXIT_SKIPPED if skipped else 0


def _preprocess(config: dict, model) -> dict:
    """The adapter's evaluation pipeline as data (ivpt.deploy.preprocess_of), read at the model's backbone."""
    from .deploy import preprocess_of

    return preprocess_of(config, getattr(model.backbone, "pretrained_cfg", None) or {})


# -- explain -------------------------------------------------------------------------------------
def cmd_explain(args) -> int:
    import torch

    from .api import image_files, readable_batches
    from .engine.checkpoint import atomic_write
    from .explain import denormalize, explain, plot_adapter, plot_image
    from .extras import require

    require("matplotlib", "ivpt explain's figures")  # missing: said before any work
    model, config = _load_for_inference(args.adapter, args.weights)
    model.eval()
    files = image_files(args.images)
    if config.get("task") == "segmentation":  # one centre window at the training crop size
        from .engine.data import adapter_reads_upright

        crop = int(config["crop_size"])
        preprocess = {"resize": crop, "crop": crop, "interpolation": "bilinear", "mean": config["mean"],
                      "std": config["std"], "exif_orientation": adapter_reads_upright(config.get("data"))}
    else:
        preprocess = _preprocess(config, model)
    from .deploy import transform_of

    transform = transform_of(preprocess)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{config['method']} on {(config.get('backbone') or {}).get('name') or 'its backbone'}"
    records, last, batches, skipped = [], None, [], []
    for chunk, batch in readable_batches(files, args.batch_size, args.strict, transform,
                                         preprocess["exif_orientation"], skipped):
        batches.append(batch)
        last = explain(model, batch)
        pixels = denormalize(batch, config["mean"], config["std"])
        for n, (f, e) in enumerate(zip(chunk, last.to_dict()["images"])):
            figure = out / f"{len(records):04d}_{f.stem}.png"
            plot_image(last, n, pixels[n], figure, title=f"{title} | {f.name}")
            records.append({"image": str(f), "figure": str(figure), **e})
            print(f"{f}\t{figure}" + (f"\t{e['prediction']} {e['score']:.3f}" if e["prediction"] is not None else ""))
    if not batches:
        raise ValueError(f"none of the {len(files)} image(s) given could be read (see the warnings above)")
    # learned quantities: DA's gate values gathered over every image given, the rest from the tensors
    whole = explain(model, torch.cat(batches)) if len(batches) > 1 else last  # each image decoded once
    plot_adapter(whole, out / "adapter.png", title=f"{title}: learned per-transition quantities")
    summary = {k: v for k, v in whole.to_dict().items() if k != "images"}
    summary.update(adapter=str(args.adapter), adapter_revision=config["loaded_from"],
                   adapter_figure=str(out / "adapter.png"), images=records, skipped=skipped)
    atomic_write(out / "explain.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    print(f"figures and explain.json in {out}/")
    return _skipped_exit(skipped)


# -- push ----------------------------------------------------------------------------------------
def cmd_push(args) -> int:
    from .hub import push_to_hub

    where = push_to_hub(args.source, args.repo, private=args.private, dry_run=args.dry_run)
    if args.dry_run:
        files = sorted(p.name for p in Path(where).iterdir())
        print(f"dry run: {where} holds what would be uploaded to {args.repo}: {', '.join(files)}")
    else:
        print(f"pushed {args.source} as {where}; load it with ivpt.load_adapter({where!r}) (that exact revision) "
              f"or 'hf-hub:{args.repo}' (its latest)")
    return 0


# -- export --------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .engine.checkpoint import atomic_write

    if args.onnx:
        return _export_onnx(args)
    if args.opset is not None:
        raise ValueError("--opset applies to --onnx; a merged checkpoint has no opset")
    out = _merged_path(args.merged)
    model, config = _load_for_inference(args.adapter, args.weights)
    _refuse_overwriting_inputs(out, args.adapter, config, args.weights)
    if config.get("task") == "segmentation":
        raise ValueError(f"adapter {args.adapter} is a segmentation model: its decoder has no place in a timm "
                         "classification checkpoint; share the adapter folder instead")
    merged = model.merge()  # ValueError, naming why, for methods that cannot be merged
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    name = (config.get("backbone") or {}).get("name") or "ARCH"
    print(f"wrote {out}: {config['method']} merged into {name} (a plain timm checkpoint, head of "
          f"{config['num_classes']} classes)")
    print(f"load it with: {_timm_load_call(name, config, out)}")
    if name.split(".")[0] in _own_architectures():  # the checkpoint holds no preprocessing: say it
        from .deploy import input_size

        print(f"preprocess as it was tuned: {input_size(config)} px, mean {config['mean']}, std {config['std']}")
    return 0


def _export_onnx(args) -> int:
    from .deploy import OPSET, export_onnx

    out = _output_path(args.onnx, ".onnx", "--onnx", "onnxruntime and other runtimes read .onnx files")
    model, config = _load_for_inference(args.adapter, args.weights)
    _refuse_overwriting_inputs(out, args.adapter, config, args.weights, "--onnx")
    meta = export_onnx(model, out, config, opset=args.opset or OPSET)
    size = out.stat().st_size
    print(f"wrote {out}: {config['method']} on {meta['backbone'] or 'its backbone'}"
          + (" (merged into the backbone's weights)" if meta["merged"] else "") + f", {meta['task']}, "
          f"opset {meta['opset']}, {size / 2**20:.1f} MiB; input {meta['input_name']!r} (batch, 3, H, W), output "
          f"{meta['output_name']!r}; preprocessing and class names in its metadata")
    print(f"run it: ivpt predict --onnx {out} IMAGES...  (or onnxruntime alone: docs/usage.md#deploy-with-onnx)")
    return 0


def _own_architectures() -> dict:
    from .backbones.architectures import ARCHITECTURES

    return ARCHITECTURES


def _timm_load_call(name: str, config: dict, out: Path) -> str:
    """One line of Python, with no ivpt in it, that builds the merged model from ``out``."""
    k = config["num_classes"]
    timm_kwargs = (config.get("backbone") or {}).get("timm_kwargs") or {}
    kwargs = "".join(f", {key}={value!r}" for key, value in timm_kwargs.items())
    arch = name.split(".")[0]
    if arch in _own_architectures():  # registered with timm by ivpt only: timm's own class, built from its settings
        settings = {**_own_architectures()[arch], **timm_kwargs}
        args = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        return ("import safetensors.torch; from timm.models.vision_transformer import VisionTransformer; "
                f"model = VisionTransformer({args}, num_classes={k}); "
                f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))")
    if name.startswith("hf-hub:"):  # timm loads a Hub name's weights from the Hub whatever file= says
        return (f"import timm, safetensors.torch; model = timm.create_model({name!r}, num_classes={k}{kwargs}); "
                f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))")
    # the name keeps its tag: the tag's pretrained config (mean, std, crop) is the preprocessing it was tuned with
    return (f"import timm; model = timm.create_model({name!r}, pretrained=True, num_classes={k}{kwargs}, "
            f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={k}))")


def _merged_path(text: str) -> Path:
    """--merged OUT, checked before any work: a .safetensors file (what the printed timm call loads) in a folder
    that exists."""
    return _output_path(text, ".safetensors", "--merged", "timm reads any other suffix with torch.load, which "
                        "cannot load what export writes")


def _output_path(text: str, suffix: str, flag: str, why: str) -> Path:
    """An output file named by ``flag``, checked before any work: the suffix, not a folder, its folder there."""
    out = Path(text)
    if out.suffix.lower() != suffix:
        raise ValueError(f"{flag} {text}: expected a {suffix} file name ({why})")
    if out.is_dir():
        raise ValueError(f"{flag} {text} is a folder; expected a {suffix} file to write")
    if not out.parent.is_dir():
        raise ValueError(f"{flag} {text}: folder {out.parent} does not exist")
    return out


def _refuse_overwriting_inputs(out: Path, adapter: str, config: dict | None, weights: str | None,
                               flag: str = "--merged") -> None:
    """Never write an output over the adapter's own files or the backbone weights it was loaded with."""
    from .adapter_format import CONFIG_FILE, TENSORS_FILE, read_adapter_config
    from .card import CARD_FILE

    if config is None and Path(adapter).is_dir():
        with warnings.catch_warnings():  # a stale JSON copy: the command's own read of it says so, once
            warnings.simplefilter("ignore")
            config = read_adapter_config(adapter)
    inputs = [Path(adapter) / name for name in (TENSORS_FILE, CONFIG_FILE, CARD_FILE)] + [Path(adapter)]
    inputs += [Path(w) for w in (weights, ((config or {}).get("backbone") or {}).get("weights_file")) if w]
    target = Path(out).resolve()  # resolve() follows links
    for path in inputs:
        if target == path.resolve():
            raise ValueError(f"{flag} {out} is {path}, an input of this command; choose another file name "
                             "(nothing was written)")


# -- params --------------------------------------------------------------------------------------
def parameter_table(backbone: str, methods: list[str], num_classes: int, prompt_length: int,
                    options: dict | None = None) -> list[dict]:
    import torch

    from . import create_model
    from .factory import count_parameters
    from .methods import METHODS, IVPTConfig, prompt_options

    arch = backbone.split(".", 1)[0]  # shapes only: no weights needed, built on the meta device
    rows = []
    with torch.device("meta"):
        for method in methods:
            extra = prompt_options(method, prompt_length)
            if options and (issubclass(METHODS[method].config_class, IVPTConfig) or len(methods) == 1):
                extra.update(options)  # iVPT's switches apply to ivpt and its presets; one method: its own
            model = create_model(arch, method, num_classes, **extra)
            counts = count_parameters(model)
            counts["method"] = method
            # the method's own tensors (the task head aside) as a share of the backbone's own parameters
            counts["tuned_%"] = round(100 * counts["tuned_without_head"] / counts["backbone"], 3)
            rows.append(counts)
    return rows


def cmd_params(args) -> int:
    from .factory import method_class
    from .methods import METHODS, prompt_options
    from .options import OptionError

    if args.method != "all":
        method_class(args.method)  # an unknown name: an OptionError listing the methods
    methods = list(METHODS) if args.method == "all" else [args.method]
    prompted = [m for m in methods if prompt_options(m, 1)]
    if args.prompt_length is not None and not prompted:
        raise OptionError(f"--prompt-length: method {args.method!r} has no prompts, so a prompt length would "
                          "change nothing; leave the flag out")
    prompt_length = 10 if args.prompt_length is None else args.prompt_length
    if args.backbone is None:
        from .backbones import DEFAULT_BACKBONE

        args.backbone = DEFAULT_BACKBONE
    options = _json_object("--options", args.options, '\'{"lora_rank": 4}\'') or {}
    rows = parameter_table(args.backbone, methods, args.num_classes, prompt_length, options)
    print(f"{args.backbone}, {args.num_classes} classes" + (f", prompt length {prompt_length}" if prompted else ""))
    print("tuned: every trained tensor, head included; tuned_%: the tuned tensors without the head, as a "
          "percentage of the backbone's own parameters")
    # each method's own components (parameter_groups), in the order the methods name them
    shared = {"method", "tuned", "tuned_%", "head", "backbone", "total", "tuned_without_head"}
    groups = list(dict.fromkeys(k for r in rows for k in r if k not in shared))
    print_table(rows, ["method", "tuned", "tuned_%", "head", *groups, "backbone"])
    if args.output:
        from .engine.checkpoint import atomic_write

        atomic_write(Path(args.output), lambda tmp: tmp.write_text(json.dumps(rows, indent=2)))
    return 0


# -- tune ----------------------------------------------------------------------------------------
def _user_path(text: str) -> str:
    """A path argument with ``~`` expanded: a shell leaves it in ``--output=~/x`` and in quotes; Hub names
    (hf-hub:...) pass through."""
    return text if text.startswith("hf-hub:") else os.path.expanduser(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number above 0")
    return value


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected 0 <= i < n")
    return index, count


def _warn_grid_edge(cfg, summary: dict, where: str = "") -> None:
    """One line when the choice is the largest or smallest lr or wd of the grid (a choice given, none)."""
    import warnings

    from .engine.protocol import VPT_LRS, VPT_WDS, grid_edge_warning

    if not summary.get("grid"):  # the grid was not searched here (a reused choice)
        return
    line = grid_edge_warning(summary["chosen"], cfg.protocol.get("lrs", VPT_LRS), cfg.protocol.get("wds", VPT_WDS))
    if line:
        warnings.warn(where + line)


def cmd_tune(args) -> int:
    from .api import tune_suite
    from .data.suite import SUITE_TASKS
    from .engine.config import load_config
    from .engine.study import tune

    cfg = load_config(args.config, list(args.set or []))
    out = Path(args.output or cfg.output)
    options = dict(storage=args.storage, workers=args.workers, pruner=args.pruner, heartbeat=args.heartbeat,
                   devices=args.devices.split(",") if args.devices else None)
    if args.tasks:
        if cfg.data.get("kind") != "suite":
            raise ValueError("--tasks applies to recipes whose data kind is 'suite'")
        tasks = list(SUITE_TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
        unknown = [t for t in tasks if t not in SUITE_TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown suite task {unknown[0]!r}; expected {', '.join(SUITE_TASKS)} or all")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"--tasks {args.tasks}: a task is listed twice; list each once")
        merged = tune_suite(cfg, tasks, out, **options)
        for task, summary in merged["tasks"].items():
            _warn_grid_edge(cfg, summary, f"{task}: ")
        rows = [{"task": t, "group": SUITE_TASKS[t][0], "test_mean": round(s["test_mean"], 4),
                 "test_std": round(s["test_std"], 4), "lr": s["chosen"]["lr"], "wd": s["chosen"]["weight_decay"]}
                for t, s in merged["tasks"].items()]
        print_table(rows, ["task", "group", "test_mean", "test_std", "lr", "wd"])
        print(f"test top-1 (fractions): mean of group means {merged['mean_of_group_means']:.4f}, "
              f"plain mean {merged['plain_mean']:.4f}")
        return 0
    summary = tune(cfg, out, **options)
    _warn_grid_edge(cfg, summary)
    print(json.dumps({"chosen": summary["chosen"], "test_mean": round(summary["test_mean"], 4),
                      "test_std": round(summary["test_std"], 4), "summary": str(out / "summary.json")}))
    return 0


# -- benchmark -----------------------------------------------------------------------------------
def cmd_benchmark(args) -> int:
    from . import benchmark

    jobs = benchmark.plan(args.benchmark, args.recipes, args.methods, args.tasks, list(args.set or []), args.output)
    if args.dry_run:
        print(benchmark.plan_text(benchmark.estimate(jobs, args.pruner, args.tflops), jobs))
        return 0
    out = Path(args.output)
    if not args.table_only:
        benchmark.check_jobs(jobs)  # bad input said before anything (the table included) is written
    try:
        if not args.table_only:
            benchmark.run(jobs, storage=args.storage, workers=args.workers, pruner=args.pruner, heartbeat=args.heartbeat,
                          devices=args.devices.split(",") if args.devices else None)
    finally:  # what is finished so far, also when a run failed or was interrupted
        result = benchmark.table(jobs, args.benchmark)
        benchmark.write_table(result, out)
    print("\n".join(benchmark.overview(result, benchmark.FAMILIES[args.benchmark])))
    print(f"table: {out / 'table.md'} (and .csv, .json, .png)")
    return 0


# -- quickstart (the main job) -----------------------------------------------------------------
def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(task=args.task, output=args.output, epochs=args.epochs)
    return 0


# -- pretrain ------------------------------------------------------------------------------------
def cmd_pretrain(args, rest: list[str]) -> int:
    from .backbones.pretrain import main as pretrain

    pretrain(rest, prog="ivpt pretrain")
    return 0


def _config_fields_help() -> str:
    import dataclasses

    from .engine.config import TrainConfig

    lines = ["config fields (recipe keys, or --set KEY=VALUE; values are YAML):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


def _inference_flags(p) -> None:
    p.add_argument("--device", default="auto", help="auto (a CUDA device where there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default: the same numbers on every machine), auto (bf16 where the device computes it "
                        "natively, as training's auto), bf16 or fp16 (CUDA) autocast")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="ivpt", description="Visual prompt tuning (iVPT and baselines) for timm ViTs")
    parser.add_argument("--version", action="version", version=f"ivpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # one function per subcommand, below
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_explain(sub)
    _add_push(sub)
    _add_export(sub)
    _add_params(sub)
    _add_convert(sub)
    _add_tune(sub)
    _add_benchmark(sub)
    _add_quickstart(sub)
    _add_pretrain(sub)
    _add_data(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one method on one dataset", epilog=_config_fields_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one method on one dataset from a YAML recipe plus key=value overrides. "
                                   "Writes config.yaml, metrics.jsonl/csv, a checkpoint every epoch, the adapter "
                                   "and results.json into the output folder.")
    p.add_argument("config", nargs="*", help="YAML recipe(s) (see configs/; a later file's fields replace an "
                   "earlier one's, e.g. a dataset's recipe then configs/protocols/vtab-lora.yaml); fields not "
                   "given keep their defaults")
    p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="override recipe fields, e.g. lr=0.5 method_options.prompt_length=20 data.task=dtd10 (may be "
                        "given several times; every one applies, a key given twice with two values is refused)")
    p.add_argument("--output", type=_user_path, help="run folder (overrides the recipe's output)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder")
    again.add_argument("--restart", action="store_true",
                       help="start the run in the output folder over: its checkpoint, logs, results and adapter are "
                            "moved to OUTPUT.replaced-<time>/ first (e.g. a damaged checkpoint that --resume refuses)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved adapter on a split",
                       description="Classification: top-1 of an adapter on a split, with per-class accuracy and "
                                   "the confusion matrix in --output. Segmentation: mIoU (single scale, sliding "
                                   "window), per-class IoU and pixel accuracy.")
    p.add_argument("adapter", type=_user_path, help="adapter folder (adapter.safetensors + adapter_config.json)")
    p.add_argument("--split", default="test", help="train, val, trainval or test (default test)")
    p.add_argument("--data", help="dataset spec as JSON (default: the one recorded in the adapter)")
    p.add_argument("--weights", type=_user_path, help="local backbone weights (default: as recorded in the adapter)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--multiscale", nargs="*", type=_positive_float, metavar="SCALE",
                   help="segmentation: mIoU-MS, averaging these scales with horizontal flips "
                        "(no values: 0.5 0.75 1.0 1.25 1.5 1.75); default single scale")
    _inference_flags(p)
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the model first (optionally a mode: reduce-overhead, max-autotune, ...)")
    p.add_argument("--output", type=_user_path, help="results JSON to write")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip it with "
                   "a warning, list it under 'skipped' and exit 3)")
    p.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels (or segmentation masks) for images or folders",
                       description="Classification adapters: top-k labels with scores (printed, and as JSON with "
                                   "--output). Segmentation adapters: a colour-coded mask and an overlay PNG per "
                                   "image, and legend.json, in the --output folder (default predictions/).")
    p.usage = ("ivpt predict [options] ADAPTER IMAGE [IMAGE ...]\n       "
               "ivpt predict --onnx MODEL.onnx [options] IMAGE [IMAGE ...]")
    p.add_argument("inputs", nargs="+", type=_user_path, metavar="ADAPTER/IMAGE",
                   help="the adapter folder (or hf-hub:ORG/NAME), then image files or folders; with --onnx, "
                        "image files or folders only")
    p.add_argument("--onnx", type=_user_path, metavar="MODEL.onnx",
                   help="run a file written by ivpt export --onnx with onnxruntime instead of an adapter "
                        "(pip install 'ivpt[onnx]'): the same preprocessing and output")
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    _inference_flags(p)
    p.add_argument("--weights", type=_user_path, help="local backbone weights (default: as recorded in the adapter)")
    p.add_argument("--output", type=_user_path, help="predictions JSON to write: {adapter, adapter_revision, predictions: [...], "
                   "skipped: [...]}")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip it with "
                   "a warning, list it under 'skipped' and exit 3)")
    p.set_defaults(func=cmd_predict)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="figures of what the prompts do: saliency, AR's patches, DA and AR weights",
                       description="For every image, a PNG of the input and each block's saliency (the class "
                                   "token's attention over the patches, as AR uses it) with the patches AR "
                                   "reinforced outlined, and the prediction; for the adapter, adapter.png with "
                                   "DA's mixing weight, AR's gamma and AR's relative change per transition; all "
                                   "numbers in explain.json. Works for every prompt method (VPT-deep: attention "
                                   "maps only) and segmentation adapters (one centre crop). Needs matplotlib: "
                                   "pip install 'ivpt[explain]'.")
    p.add_argument("adapter", type=_user_path, help="adapter folder")
    p.add_argument("images", nargs="+", type=_user_path, help="image files or folders")
    p.add_argument("--output", type=_user_path, required=True, help="folder for the figures and explain.json")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--weights", type=_user_path, help="local backbone weights (default: as recorded in the adapter)")
    p.set_defaults(func=cmd_explain)


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="publish an adapter with its model card to the Hugging Face Hub",
                       description="Uploads adapter.safetensors, adapter_config.json and a model card (README.md, "
                                   "written from the adapter's record: method, backbone, tuned parameters, data, "
                                   "recipe, metrics; a protocol run's seeds from summary.json) to REPO, creating "
                                   "it if needed. Uses huggingface_hub's login token. Read it back anywhere with "
                                   "hf-hub:REPO as the adapter (ivpt eval, predict, explain, ivpt.load_adapter).")
    p.add_argument("source", type=_user_path, help="adapter folder, a run folder holding adapter/, or an ivpt tune folder (its first "
                   "seed's adapter; the card lists every seed)")
    p.add_argument("repo", help="Hub repository, ORG/NAME")
    visibility = p.add_mutually_exclusive_group()  # neither: a new repository gets the Hub's (organisation's) default
    visibility.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                            help="the repository is private (created so; an existing public one is refused)")
    visibility.add_argument("--public", dest="private", action="store_const", const=False,
                            help="the repository is public (created so; an existing private one is refused)")
    p.add_argument("--dry-run", type=_user_path, metavar="DIR", help="write exactly what would be uploaded into DIR; send nothing")
    p.set_defaults(func=cmd_push)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="an adapter as an ONNX file, or folded into a plain timm checkpoint",
                       description="--onnx OUT.onnx: the eval-mode model of any method (classification or "
                                   "segmentation) as one ONNX graph with a dynamic batch, its class names, "
                                   "input size, mean, std, resize and crop, method and adapter digest in the "
                                   "file's metadata; onnxruntime runs it without PyTorch or ivpt (ivpt predict "
                                   "--onnx does). Methods that merge are exported merged. --merged "
                                   "OUT.safetensors: the backbone with the method folded into its weights, head "
                                   "included, as a checkpoint timm loads with no ivpt code; for methods whose "
                                   "change is linear in the weights (lora, ssf, bitfit; linear and full too); "
                                   "prompt methods and bottleneck adapters cannot be merged and say so.")
    p.add_argument("adapter", type=_user_path, help="adapter folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", type=_user_path, metavar="OUT.onnx", help="ONNX file to write "
                        "(pip install 'ivpt[onnx]')")
    target.add_argument("--merged", type=_user_path, metavar="OUT", help="safetensors file to write")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: ivpt.deploy.OPSET)")
    p.add_argument("--weights", type=_user_path, help="local backbone weights (default: as recorded in the adapter)")
    p.set_defaults(func=cmd_export)


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="tuned-parameter table for a backbone and one or all methods")
    p.add_argument("--backbone", default=None, help="timm model name (default: the shipped default backbone, "
                   "as ivpt train uses it)")
    p.add_argument("--method", default="all", help="a method name or 'all'")
    p.add_argument("--num-classes", type=_positive_int, default=100, help="classes of the task head (default: %(default)s)")
    p.add_argument("--prompt-length", type=_positive_int, default=None,
                   help="prompt length of the prompt methods (default: 10; refused for a method without prompts)")
    p.add_argument("--options", help="method options as JSON: iVPT's switches for ivpt and its presets, or the named method's own, e.g. '{\"lora_rank\": 4}'")
    p.add_argument("--output", type=_user_path, help="JSON file to write the table to")
    p.set_defaults(func=cmd_params)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert-weights", help="a MoCo v3 or MAE checkpoint in its authors' format, as a timm "
                       ".safetensors file", description="MoCo v3 (the pretraining vit-b-300ep.pth.tar or the "
                       "linear-probe linear-vit-b-300ep.pth.tar that VPT loads): the base encoder under timm's names, "
                       "for vit_base_patch16_224. MAE (mae_pretrain_vit_base.pth): the encoder for "
                       "vit_base_patch16_224.mae with backbone_options {global_pool: avg}, fc_norm as VPT's code "
                       "leaves it (weight 1, bias 0), or with --norm-after-pool the checkpoint's norm there, as "
                       "GateVPT's code applies it. Pass the output as the recipe's weights.")
    p.add_argument("format", choices=("moco-v3", "mae"), help="the checkpoint's format")  # = convert.FORMATS
    p.add_argument("checkpoint", type=_user_path, help="the downloaded checkpoint file")
    p.add_argument("output", type=_user_path, metavar="OUT.safetensors", help="file to write")
    p.add_argument("--norm-after-pool", action="store_true", help="MAE: the pretrained final norm after the "
                   "pooling (GateVPT's reading) instead of a fresh one (VPT's)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .convert import convert_weights

    out = convert_weights(args.format, args.checkpoint, args.output, norm_after_pool=args.norm_after_pool)
    print(f"wrote {out}")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="VPT protocol: lr x wd grid on train->val, then seeds on train+val->test",
                       description="The grid (train -> val) and the final seeds (train+val -> test) as Optuna "
                                   "studies: best val top-1 wins (ties: smaller lr, then larger wd). Studies live "
                                   "in --storage (default: SQLite in the output folder), so any number of "
                                   "processes on any number of machines join by running the same command; "
                                   "finished runs are never repeated, a dead worker's run is retried from its "
                                   "checkpoint.")
    p.add_argument("config", nargs="+", help="YAML recipe(s), its 'protocol' field sets lrs, wds and seeds; a later "
                   "file's fields replace an earlier one's (a method's protocol: configs/protocols/)")
    p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="override recipe fields (may be given several times; every one applies)")
    p.add_argument("--output", type=_user_path, help="tuning folder (default: the recipe's output)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by every worker: sqlite:///PATH, "
                   "postgresql://USER:PASS@HOST/DB, or journal:PATH (default: sqlite in the output folder)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes to start here (default 1)")
    p.add_argument("--devices", metavar="0,1,...", help="GPU ids: worker k uses device k mod len")
    p.add_argument("--pruner", choices=("none", "sha", "asha", "hyperband"), default="sha",  # = study.PRUNERS
                   help="stop weak grid points early: sha, successive halving rung by rung (default); asha, "
                   "Optuna's asynchronous one; hyperband; or none, every point to the end")
    p.add_argument("--heartbeat", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="worker heartbeat; a trial silent for twice this is retried (default 30)")
    p.add_argument("--tasks", help="with a suite recipe: 'all' or a comma-separated list of offline-suite tasks")
    p.set_defaults(func=cmd_tune)


BENCHMARKS = ("vtab-1k", "fgvc", "suite")  # = ivpt.benchmark.FAMILIES, named here so that --help imports no torch
ASSUMED_TFLOPS = 30.0                       # = ivpt.benchmark.ASSUMED_TFLOPS


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="the protocol on every (method, task) of VTAB-1k, FGVC or the offline suite, "
                       "and the table beside the published figures",
                       description="Runs ivpt tune's protocol (grid on train -> val, seeds on train+val -> test) for "
                                   "every method and task into OUTPUT/<method>/<task>/ (resumable: a finished pair "
                                   "whose summary.json matches its config is not touched), then writes "
                                   "OUTPUT/table.{md,csv,json,png}: test mean and std over seeds per task, group "
                                   "means, the mean of groups and the plain mean, the chosen lr and wd (marked on a "
                                   "grid edge), tuned parameters, GPU-hours logged, and the published figure beside "
                                   "each of ours with the difference. The recipes and the published figures ship "
                                   "with ivpt. Machines sharing --storage and the output folder share the work.")
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("recipes", nargs="*", metavar="RECIPE",
                   help="recipe layers, in order (a later one's fields replace an earlier one's): YAML files, packaged "
                        "names (suite/protocol, protocols/vtab-petl) or the benchmark's name for its per-task recipes "
                        "(default: vtab-1k -> configs/vtab/<task>.yaml, fgvc -> configs/fgvc/<dataset>.yaml, suite -> "
                        "configs/suite/protocol.yaml)")
    p.add_argument("--methods", nargs="+", required=True, metavar="M",
                   help="methods (ivpt's names; also iVPT's ablations cdc-static, cdc-da, ar-only, at iVPT's choice); "
                        "lora, adapter, adaptformer, ssf and bitfit train under configs/protocols/<benchmark>-petl.yaml")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the benchmark's tasks (default: all)")
    p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="override recipe fields for every task and method, e.g. weights=ViT-B_16.npz data.root=DIR")
    p.add_argument("--output", type=_user_path, required=True, help="benchmark folder: <method>/<task>/ and table.*")
    p.add_argument("--storage", metavar="URL", help="one Optuna storage for every study, shared by every machine "
                   "(default: SQLite in each task's folder)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes to start here (default 1)")
    p.add_argument("--devices", metavar="0,1,...", help="GPU ids: worker k uses device k mod len")
    p.add_argument("--pruner", choices=("none", "sha", "asha", "hyperband"), default="sha",
                   help="the grid stage's pruner, as ivpt tune (default sha)")
    p.add_argument("--heartbeat", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="worker heartbeat, as ivpt tune (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print the plan: runs, epochs and GPU-hours estimated "
                   "from FLOPs measured on the architecture (random weights, nothing downloaded); train nothing")
    p.add_argument("--tflops", type=_positive_float, default=ASSUMED_TFLOPS,
                   help="--dry-run: sustained TFLOP/s of one GPU assumed for the hours (default %(default)g)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: write the table of what is finished so far")
    p.set_defaults(func=cmd_benchmark)


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the main job: iVPT vs linear probe vs VPT-deep on an offline task",
                       description="Trains linear probe, VPT-deep and iVPT on the shipped default backbone on one "
                                   "procedural task of the offline suite (no data needed), prints test top-1 and "
                                   "tuned parameters side by side, and saves adapters and results.")
    p.add_argument("--task", default=None, help="offline-suite task (default: the recipe's)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs per method (default: the recipe's)")
    p.add_argument("--output", type=_user_path, default="runs/quickstart")
    p.set_defaults(func=cmd_quickstart)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", add_help=False, help="pretrain the default backbone on CIFAR-10 "
                       "(arguments: see ivpt pretrain --help)")
    p.set_defaults(func=None)


# -- data ----------------------------------------------------------------------------------------
def _expected_count(text: str) -> tuple[tuple[str, str], int]:
    """--expect TASK:SPLIT=N, e.g. kitti:test=500: the size a deliberately smaller split is checked against."""
    where, _, count = text.partition("=")
    task, _, split = where.partition(":")
    if not (task and split and count.isdigit()):
        raise argparse.ArgumentTypeError(f"--expect {text!r}: expected TASK:SPLIT=N, e.g. kitti:test=500")
    return (task, split), int(count)


def _task_list(values: list[str] | None) -> list[str] | None:
    return None if not values else [t.strip() for v in values for t in v.split(",") if t.strip()]


def _print_reports(reports, out=None) -> None:
    from .data.check import report_rows

    rows, columns = report_rows(reports)
    if rows:
        print_table(rows, columns)
    lossy = [r.task for r in reports if r.formats and not r.lossless]
    if lossy:
        print(f"note: {', '.join(lossy)}: JPEG images (lossy). Published VTAB-1k numbers differ between JPEG and "
              "lossless copies (about 10 points reported on CIFAR-100); see docs/reproduce.md", file=sys.stderr)


def _prepared_reports(out: Path) -> list:
    from .data.check import TaskReport
    from .data.prepare import prepared_tasks

    return [TaskReport(r["kind"], task, r["counts"], r["classes"], r["formats"]) for task, r in
            prepared_tasks(out).items()]


def cmd_data_prepare(args) -> int:
    from .data.datasets import DataError
    from .data.prepare import fgvc_dataset_name, prepare_fgvc, prepare_vtab, vtab_task_names

    expect = dict(args.expect or [])
    # names first: an unknown one is bad input (exit 2); what the data holds is a file problem (exit 1)
    tasks = vtab_task_names(_task_list(args.tasks)) if args.benchmark == "vtab-1k" else None
    dataset = fgvc_dataset_name(args.dataset) if args.benchmark == "fgvc" else None
    try:
        if args.benchmark == "vtab-1k":
            prepare_vtab(args.source, args.out, tasks, args.workers, expect, _task_list(args.allow_duplicates) or ())
        else:
            prepare_fgvc(dataset, args.source, args.splits, args.out, args.workers, expect)
    except DataError as err:
        _print_reports(_prepared_reports(Path(args.out)))
        print(f"ivpt: {err}", file=sys.stderr)
        return 1
    _print_reports(_prepared_reports(Path(args.out)))
    print(f"manifest: {Path(args.out) / 'ivpt-data.json'}")
    return 0


def cmd_data_check(args) -> int:
    from .data.check import check_folder, default_workers, read_manifest

    from .data.datasets import DataError

    try:
        reports = check_folder(args.folder, dict(args.expect or []), args.workers or default_workers(),
                               _task_list(args.allow_duplicates) or ())
    except DataError as err:  # no folder, or nothing in it that ivpt knows: a file problem
        print(f"ivpt: {err}", file=sys.stderr)
        return 1
    _print_reports(reports)
    problems = [p for r in reports for p in r.problems]
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"ivpt data check: {len(problems)} problem(s) in {args.folder}", file=sys.stderr)
    manifest = read_manifest(Path(args.folder)) or {}
    if manifest.get("missing"):
        print(f"note: not prepared in this folder: {', '.join(manifest['missing'])}", file=sys.stderr)
    return 1 if problems else 0


def _data_flags(p) -> None:
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes decoding images (default: the CPUs available, at most 8)")
    p.add_argument("--expect", type=_expected_count, action="append", metavar="TASK:SPLIT=N",
                   help="a split deliberately of another size than the published one (checked against N); "
                        "may be given several times")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare and verify VTAB-1k, FGVC and ADE20K folders",
                       description="Prepare VTAB-1k and FGVC from a Hub dataset repository, an archive or a folder, "
                                   "verifying every file before it counts; or check a folder (prepared or made by "
                                   "hand). See docs/reproduce.md.")
    data = p.add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="download or unpack, verify and lay out a benchmark's data")
    which = prep.add_subparsers(dest="benchmark", required=True)
    vtab = which.add_parser("vtab-1k", help="the 19 VTAB-1k tasks in the processed layout",
                            description="Each task is extracted to DIR/.partial, verified (split sizes, classes, "
                                        "every image decoded, no test image with a train800val200 twin), then "
                                        "renamed into place; a rerun prepares only the missing tasks. "
                                        "DIR/ivpt-data.json is written last.")
    vtab.add_argument("--from", dest="source", type=_user_path, default="hf-hub:XiN0919/VTAB-1k",
                      metavar="SOURCE", help="hf-hub:OWNER/NAME[@REVISION] (a dataset repository), an archive (.zip, "
                                             ".tar, .tar.gz) or a folder (default: %(default)s)")
    vtab.add_argument("--out", type=_user_path, required=True, metavar="DIR")
    vtab.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to prepare (default: all 19), separated "
                                                                  "by spaces or commas")
    vtab.add_argument("--allow-duplicates", nargs="+", metavar="TASK",
                      help="tasks whose test images may share bytes with train800val200 (recorded, not refused)")
    _data_flags(vtab)
    vtab.set_defaults(func=cmd_data_prepare)
    fgvc = which.add_parser("fgvc", help="one FGVC dataset from its original archive and VPT's split files")
    fgvc.add_argument("--dataset", required=True, help="CUB_200_2011, nabirds, OxfordFlower, StanfordDogs or "
                                                       "StanfordCars (or cub, flowers, dogs, cars)")
    fgvc.add_argument("--from", dest="source", nargs="+", type=_user_path, required=True, metavar="ARCHIVE",
                      help="the dataset's original archive(s) or folder (Stanford Cars: both archives)")
    fgvc.add_argument("--splits", type=_user_path, default="hf-hub:XiN0919/FGVC", metavar="SPLITS",
                      help="VPT's split files: hf-hub:OWNER/NAME[@REVISION], an archive or a folder holding "
                           "train.json, val.json and test.json (default: %(default)s)")
    fgvc.add_argument("--out", type=_user_path, required=True, metavar="DIR")
    _data_flags(fgvc)
    fgvc.set_defaults(func=cmd_data_prepare)
    check = data.add_parser("check", help="re-verify a data folder: VTAB-1k, FGVC or ADE20K, prepared or by hand",
                            description="Prints a table per task and exits 1 on any problem, naming the task, "
                                        "split, file and what was expected.")
    check.add_argument("folder", type=_user_path, metavar="DIR")
    check.add_argument("--allow-duplicates", nargs="+", metavar="TASK",
                       help="VTAB-1k tasks whose test images may share bytes with train800val200")
    _data_flags(check)
    check.set_defaults(func=cmd_data_check)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    one_line_warnings()
    parser = build_parser()
    if argv and argv[0] == "pretrain":
        from .engine.preemption import EXIT_PREEMPTED, Preempted

        try:
            return cmd_pretrain(None, argv[1:])
        except Preempted as stop:
            print(f"ivpt: {stop}", file=sys.stderr)
            return EXIT_PREEMPTED
    args = parser.parse_args(argv)
    from .engine.preemption import EXIT_PREEMPTED, Preempted

    try:
        return args.func(args)
    except Preempted as stop:
        print(f"ivpt: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except ImportError as err:  # an optional extra that is not installed; the message names it
        print(f"ivpt: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every file written so far is complete; a training run continues with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"ivpt: disk full while writing ({err}); the last complete checkpoint and adapter are kept",
                  file=sys.stderr)
            return 1
        print(f"ivpt: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # config, option, data, adapter and checkpoint errors all derive from it
        print(f"ivpt: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
