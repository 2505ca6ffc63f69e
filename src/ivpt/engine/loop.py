"""Training and evaluation loops: one method, one dataset, one process or many (DDP)."""
from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader

from ..backbone import input_config
from ..data.cache import to_device
from ..progress import progress as tqdm_or_lines
from .checkpoint import (CheckpointError, atomic_write, checkpoint_meta, has_checkpoint, load_checkpoint,
                         save_checkpoint)
from .config import NOT_RESULT_FIELDS, ConfigError, TrainConfig, as_started, check_compile, check_inputs
from . import features as features_mod
from ..data.paths import absolute_path
from .data import TensorImages, is_folder_spec, recorded_data_spec, split_of, split_record
from .distributed import Dist, GlobalBatchSampler, init_distributed, shutdown
from .hardware import configure_threads, machine_cores, processes_on_machine, resolve_precision
from .preemption import Preempted, StepCheckpoints, StopRequest
from .runlock import RunLock
from .tasks import TASKS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device name (expected auto, cpu, cuda or cuda:N): {err}") from None


def claim_device(device: torch.device) -> torch.device:
    """Make an indexed CUDA device the current one: the loader's pinning thread, the RNG state saved for resume
    and the precision's bf16 check use the current device, and would otherwise open GPU 0."""
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def autocast_for(precision: str, device: torch.device):
    """Autocast for a resolved precision (fp32, bf16 or fp16; 'auto' is resolved first)."""
    if precision == "auto":
        precision = resolve_precision(precision, device).used
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("config field 'precision': fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to 0 (VPT's schedule) or poly decay (power 0.9), per step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return base * (1 - progress) ** 0.9
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def loader_for(dataset, batch_size: int, ctx: Dist, seed: int, shuffle: bool, workers: int,
               collate_fn=None, pin: bool = False) -> DataLoader:
    """Training loaders (shuffle) share every batch out; evaluation loaders hand out whole batches.
    Workers persist across epochs; pinned memory (CUDA) lets batches copy without blocking."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, ctx, seed, shuffle=shuffle, whole_batches=not shuffle)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn, pin_memory=pin,
                      persistent_workers=workers > 0)


def input_cache(dataset, setting: str, device: torch.device):
    """The split from the decoded-tensor cache (``cache: auto``), also moved onto the device (``device``)."""
    if setting == "off":
        return dataset
    from ..data.cache import CachedImages, cached

    served = cached(dataset)
    if setting == "device" and isinstance(served, CachedImages):
        served = served.to_device(device)
    elif setting == "device" and isinstance(served, ConcatDataset) and all(
            isinstance(part, CachedImages) for part in served.datasets):  # e.g. a folder's trainval
        joined = ConcatDataset([part.to_device(device) for part in served.datasets])
        joined.normalize_batch = served.normalize_batch
        served = joined
    return served


def _on_device(dataset) -> bool:
    if isinstance(dataset, ConcatDataset):
        return all(_on_device(part) for part in dataset.datasets)
    images = getattr(dataset, "images", None)
    return isinstance(images, torch.Tensor) and images.device.type != "cpu"


def pins(dataset, device: torch.device) -> bool:
    """Pinned host memory for a split's batches: on CUDA, unless the split already lives on the device
    (pinning a CUDA tensor fails). Judged per split: a device-cached test split beside a host train split."""
    return device.type == "cuda" and not _on_device(dataset)


def loader_workers(setting, device: torch.device, dataset) -> int:
    """``workers: auto``: none where batches are slices of decoded tensors (the cache, in-memory tasks) or the
    device is the CPU (workers would take the cores that train); on CUDA a share of this process's cores."""
    if setting != "auto":
        if int(setting) > 0 and _on_device(dataset):
            raise ValueError(f"config field 'workers': {setting} loader processes cannot read a split kept on "
                             f"{device} (cache: device); use workers: 0 or auto, or cache: auto")
        return int(setting)
    from ..data.cache import normalizer_of

    if device.type != "cuda" or normalizer_of(dataset) is not None or _on_device(dataset):
        return 0
    if isinstance(dataset, TensorImages):
        return 0
    return max(1, min(8, machine_cores() // processes_on_machine() - 1))


def compile_model(module: torch.nn.Module, setting) -> torch.nn.Module:
    """``torch.compile(module, ...)`` as the recipe's ``compile`` asks (true, a mode, or mode and backend)."""
    kwargs = check_compile(setting)
    if kwargs is None:
        return module
    backend = kwargs.get("backend", "inductor")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"config field 'compile': unknown torch.compile backend {backend!r}; expected one of "
                          f"{', '.join(torch._dynamo.list_backends())}")
    mode = kwargs.get("mode")
    return torch.compile(module, backend=backend, mode=None if mode == "default" else mode)


def evaluate(model, loader: DataLoader, num_classes: int, device, ctx: Dist | None = None, precision: str = "fp32",
             desc: str = "eval", task: str = "classification", progress: bool = True) -> dict[str, Any]:
    """Metrics of a split: classification top-1 with per-class accuracy and confusion matrix, or mIoU."""
    impl = task if not isinstance(task, str) else TASKS[task]()
    return impl.evaluate(model, loader, num_classes, device, ctx or Dist(), lambda: autocast_for(precision, device),
                         desc, progress)


def _write_log(out: Path, log: list[dict]) -> None:
    from ..tables import write_csv

    atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in log)))
    write_csv(out / "metrics.csv", log, first=("epoch",))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the JSON/CSV logs remain
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, progress: bool | None = None,
          on_epoch=None) -> dict[str, Any]:
    """Train one method on one dataset; returns (and writes) the results of the run.

    quiet: no per-epoch lines on stdout; progress: progress bars (default: not quiet). on_epoch: called
    with each epoch's log entry after its checkpoint (a resumed run replays the entries it already has);
    an exception it raises (e.g. a pruner's) stops the run there, that checkpoint kept.
    """
    cfg = as_started(cfg.validate())  # paths absolute: what the run records names the same files from anywhere
    check_inputs(cfg)  # a missing data folder or weights file said before any download or model build
    configure_threads(cfg.threads)  # several processes on one machine (torchrun ranks, shards) share its cores
    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    if ctx.active and device.type == "cuda":
        # each rank its LOCAL_RANK's GPU; modulo: a launcher that shows each rank only its own GPU
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    claim_device(device)
    out = Path(cfg.output)
    try:
        # one writer per run folder (rank 0 writes): a second process on it fails at once, naming the holder
        # SIGTERM / SIGUSR1 (preemption, a job's time limit): checkpoint at the next step boundary, then stop
        with RunLock(out) if ctx.main else contextlib.nullcontext(), StopRequest() as stopper:
            return _train(cfg, out, device, ctx, resume, quiet, (not quiet) if progress is None else progress, stopper,
                          on_epoch)
    finally:
        shutdown(ctx)


def _train(cfg: TrainConfig, out: Path, device, ctx: Dist, resume: bool, quiet: bool, progress: bool,
           stopper: StopRequest, on_epoch=None) -> dict[str, Any]:
    if has_checkpoint(out) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --restart to start it over "
                              "(its files are moved aside, not deleted), or choose another output")
    precision = resolve_precision(cfg.precision, device)
    if ctx.main and not quiet:
        print(f"precision {precision.used} ({precision.reason}); {torch.get_num_threads()} CPU threads", flush=True)
    torch.manual_seed(cfg.seed)
    impl = TASKS[cfg.task]()
    model, task = impl.build(cfg)
    model.to(device)
    if ctx.main and not quiet and getattr(task, "description", ""):
        print(f"data: {task.description}", flush=True)
    train_set = input_cache(split_of(task, cfg.train_split), cfg.cache, device)
    eval_set = None if cfg.eval_split == "none" else input_cache(split_of(task, cfg.eval_split), cfg.cache, device)
    # the linear probe on deterministic splits: the frozen backbone runs once per split, the head trains on features
    features = None
    if features_mod.cacheable(cfg, ctx, train_set, eval_set) and impl.name == "classification":
        features = {"digest": features_mod.backbone_digest(model), "head": features_mod.HeadOnly(model)}
        featurize = lambda d: features_mod.features_of(model, d, device, lambda: autocast_for(precision.used, device),  # noqa: E731
                                                      precision.used, features["digest"])
        train_set = featurize(train_set)
        eval_set = None if eval_set is None else featurize(eval_set)
        features["featurize"] = featurize
    base_lr = cfg.lr * (cfg.batch_size / 256 if cfg.lr_scaling else 1.0)
    tuned = model.tuned_parameters()
    optimizer = make_optimizer(list(tuned.values()), cfg, base_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler and device.type == "cuda")
    workers = loader_workers(cfg.workers, device, train_set)
    pin = pins(train_set, device)  # the training batches' copies are non-blocking where they are pinned
    train_loader = loader_for(train_set, cfg.batch_size, ctx, cfg.seed, True, workers, pin=pin)
    # segmentation label maps keep their own sizes: one image per evaluation batch
    eval_batch = max(cfg.batch_size, 256) if impl.name == "classification" else 1
    eval_loader = None
    if eval_set is not None:
        eval_loader = loader_for(eval_set, eval_batch, ctx, cfg.seed, False, loader_workers(cfg.workers, device, eval_set),
                                 pin=pins(eval_set, device))
    diagnostic_images = _diagnostic_batch(model, eval_set if eval_set is not None else train_set) if ctx.main else None
    if diagnostic_images is not None:
        diagnostic_images = diagnostic_images.to(device)  # once, not every epoch
    steps_per_epoch = len(train_loader.batch_sampler)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs

    start_epoch, start_step, partial, log, last_eval = 0, 0, None, [], None
    if resume and has_checkpoint(out):
        saved = checkpoint_meta(out).get("config") or {}
        diff = config_differences(saved, cfg)
        if diff:
            raise CheckpointError(f"cannot resume {out}: the config differs from the checkpoint's in {', '.join(diff)}"
                                  + resume_hint(saved, diff))
        used = checkpoint_meta(out).get("precision")
        if used and used != precision.used:  # precision: auto resolves per machine
            raise CheckpointError(f"cannot resume {out}: it was trained in {used}, and precision "
                                  f"{cfg.precision!r} means {precision.used} on this machine; set precision={used}")
        tensors, meta = load_checkpoint(out, optimizer)
        expected = model.adapter_tensors()
        wrong = sorted(n for n, t in expected.items() if n not in tensors or tensors[n].shape != t.shape)
        if wrong:
            raise CheckpointError(f"checkpoint in {out} does not fit the model: {', '.join(wrong[:5])}")
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(tensors[name])
        start_epoch, log = meta["epoch"], meta["log"]
        start_step, partial = meta.get("step") or 0, meta.get("partial")  # a checkpoint inside an epoch
        if meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        if ctx.main and not quiet:
            print(f"resuming {out} after epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))
        for entry in log if on_epoch else ():
            on_epoch(entry)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(_yaml(cfg.to_dict())))
    if ctx.active and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # decoder BatchNorm sees the global batch
    net = DistributedDataParallel(model) if ctx.active else model
    # compiled: the training step through DDP (as PyTorch recommends), evaluation on the model itself;
    # checkpoints, adapters and diagnostics always use the plain module (the same tensors)
    net, eval_model = compile_model(net, cfg.compile), compile_model(model, cfg.compile)
    if features is not None:
        net = eval_model = features["head"]
        if cfg.compile and ctx.main and not quiet:
            print("compile: the linear probe trains its head on cached features; there is nothing to compile",
                  flush=True)
    writer = _tensorboard(out) if ctx.main else None

    def checkpoint(epochs_done: int, step: int = 0, sums: list[float] | None = None) -> None:
        if ctx.main:
            save_checkpoint(out, model.adapter_tensors(), optimizer,
                            {"epoch": epochs_done, "step": step, "partial": sums, "log": log, "config": cfg.to_dict(),
                             "precision": precision.used,
                             "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None})
        ctx.barrier()

    policy = StepCheckpoints(cfg.checkpoint_every_steps, stopper, ctx, device)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        first = start_step if epoch == start_epoch else 0
        train_loader.batch_sampler.set_epoch(epoch)
        train_loader.batch_sampler.start = first
        _seed_step(cfg, epoch, -1, ctx)  # creating the loader's iterator draws its workers' seeds
        batches = iter(train_loader)
        _seed_step(cfg, epoch, first, ctx)
        # a run resumed inside an epoch: rank 0 carries the epoch's sums so far, the others start at 0
        sums = partial if first and partial and ctx.main else [0.0, 0.0, 0.0, 0.0]
        loss_sum, correct, seen, samples = sums
        started = time.time()
        bar = tqdm_or_lines(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", total=len(train_loader),
                            leave=False, disable=not progress or not ctx.main)
        for step, (images, labels) in enumerate(bar, start=first):
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total_steps, warmup_steps, base_lr, cfg.schedule)
            global_count = len(train_loader.batch_sampler.global_batches()[step])
            micro = list(zip(images.chunk(cfg.accumulation), labels.chunk(cfg.accumulation)))
            for i, (x, y) in enumerate(micro):
                x, y = to_device(x, train_set, device), y.to(device, non_blocking=pin)
                sync = i == len(micro) - 1
                with (net.no_sync() if ctx.active and not sync else contextlib.nullcontext()):
                    with autocast_for(precision.used, device):
                        logits = net(x).float()
                    loss = impl.per_sample_loss(logits, y, cfg).sum()
                    # sum / global batch, times world because DDP averages gradients over processes
                    scaler.scale(loss * ctx.world / global_count).backward()
                loss_sum += loss.item()
                hit, units = impl.hits(logits, y)
                correct, seen, samples = correct + hit, seen + units, samples + len(y)
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(tuned.values()), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if seen:
                bar.set_postfix(loss=f"{loss_sum / samples:.3f}", acc=f"{correct / seen:.3f}")
            _seed_step(cfg, epoch, step + 1, ctx)  # the next batch's draws, the same after a resume here
            action = policy.after_step(epoch * steps_per_epoch + step + 1, step + 1 == steps_per_epoch)
            if action:
                checkpoint(epoch, step + 1, ctx.all_sum([loss_sum, correct, seen, samples], device))
                if action == "stop":
                    raise Preempted(f"stopped by {stopper.signal or 'a signal'} after step {step + 1}/{steps_per_epoch} "
                                    f"of epoch {epoch + 1}; checkpoint written: continue with --resume", str(out))
        train_loader.batch_sampler.start = 0
        loss_sum, correct, seen, samples = ctx.all_sum([loss_sum, correct, seen, samples], device)
        accuracy = "train_top1" if impl.name == "classification" else "train_pixel_accuracy"
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / samples, accuracy: correct / seen,
                 "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 3)}
        last_epoch = epoch + 1 == cfg.epochs
        if eval_loader is not None and (last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            metrics = evaluate(eval_model, eval_loader, len(task.classes), device, ctx, precision.used, cfg.eval_split, impl,
                               progress)
            last_eval = (epoch + 1, metrics)
            entry.update({f"{cfg.eval_split}_{key}": metrics[key] for key in (impl.primary, "loss") if key in metrics})
        if diagnostic_images is not None:  # DA's weight, AR's gamma and AR's relative change per transition
            from ..explain import epoch_diagnostics

            entry.update(epoch_diagnostics(model, diagnostic_images))
        log.append(entry)
        checkpoint(epoch + 1)
        if ctx.main:
            _write_log(out, log)
            if writer:
                for key, value in entry.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
            if not quiet:
                print(json.dumps(entry), flush=True)
        if on_epoch is not None:
            on_epoch(entry)
        if not last_epoch and stopper.agreed(ctx, device):  # asked to stop during the evaluation
            raise Preempted(f"stopped by {stopper.signal or 'a signal'} after epoch {epoch + 1}; checkpoint written: "
                            "continue with --resume", str(out))

    results = {"config": cfg.to_dict(), "task": impl.name, "primary_metric": impl.primary, "classes": task.classes,
               "precision": precision.to_dict(), "threads": torch.get_num_threads(),
               "data_description": getattr(task, "description", ""),
               "epochs_run": len(log), "parameters": impl.parameters(model), "log": log}
    if eval_loader is not None and log:
        # the last epoch's evaluation is the final one; only a resumed, already finished run evaluates again
        results[cfg.eval_split] = (last_eval[1] if last_eval and last_eval[0] == len(log) else
                                   evaluate(eval_model, eval_loader, len(task.classes), device, ctx, precision.used,
                                            cfg.eval_split, impl, progress))
    if cfg.test_split:
        test_set = input_cache(split_of(task, cfg.test_split), cfg.cache, device)
        if features is not None and features_mod.cacheable(cfg, ctx, test_set):
            test_set = features["featurize"](test_set)
        elif features is not None:  # a test split that is not cached: the whole model on its images
            eval_model = compile_model(model, cfg.compile)
        test_loader = loader_for(test_set, eval_batch, ctx, cfg.seed, False, loader_workers(cfg.workers, device, test_set),
                                 pin=pins(test_set, device))
        results["test"] = evaluate(eval_model, test_loader, len(task.classes), device, ctx, precision.used, "test", impl,
                                   progress)
    if ctx.main:
        summary = {k: results[k][impl.primary] for k in (cfg.eval_split, "test") if k in results}
        extra = {"segmentation": cfg.segmentation} if impl.name == "segmentation" else {}
        splits = split_record(task) if impl.name == "classification" else None
        if splits:
            extra["data_splits"] = splits  # ivpt eval refuses a folder changed since (ivpt.engine.data)
        # the card (README.md) shows the effective recipe and the command line that ran it
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None
        reading = input_config(model.backbone) if impl.name == "classification" else None
        model.save_adapter(out / "adapter", metrics=summary, data=recorded_data_spec(cfg.data, reading),
                           training_config=cfg.to_dict(),
                           command=command, **extra)
        results["adapter"] = str(out / "adapter")
        atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
        if writer:
            writer.close()
    ctx.barrier()
    return results


def _seed_step(cfg: TrainConfig, epoch: int, step: int, ctx: Dist) -> None:
    """Seed the draws of one step (prompt dropout, augmentation): the same after a resume at that step,
    different per process."""
    torch.manual_seed(cfg.seed * 1009 + epoch * 7919 + (step + 1) * 104_729 + ctx.rank * 1_000_003)


def _diagnostic_batch(model, dataset, count: int = 32) -> torch.Tensor | None:
    """A fixed batch for the per-epoch diagnostics of methods with DA or AR (None: nothing to log).

    Classification only: segmentation images differ in size (``ivpt explain`` covers them).
    """
    from ..encoder import PromptedViT

    method = getattr(model, "method", None)
    if not isinstance(model, PromptedViT) or not (getattr(method, "aggregation", None) or getattr(method, "reinforcement", None)):
        return None
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return to_device(images, dataset, torch.device("cpu"))  # normalised, as the model sees it


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The fields that change a run's result in which a saved run's config differs from ``cfg``."""
    saved = _result_fields(saved)
    return [k for k, v in _result_fields(cfg.to_dict()).items() if saved.get(k) != v]


def _result_fields(config: dict) -> dict:
    """The config fields that change a run's result (not where it is written or how it is fed)."""
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


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
