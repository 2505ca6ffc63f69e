"""Training and evaluation loops: one method, one dataset, one process or many (DDP)."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..data.cache import to_device
from ..progress import progress as tqdm_or_lines
from .checkpoint import (CheckpointError, atomic_write, checkpoint_meta, has_checkpoint, load_checkpoint,
                         save_checkpoint)
from . import features as features_mod
# config_differences and resume_hint: also imported from here by the study
from .config import (ConfigError, TrainConfig, as_started, check_compile, check_inputs, config_differences,
                     resume_hint)
from .data import TaskData, TensorImages, split_of
from .distributed import Dist, GlobalBatchSampler, init_distributed, shutdown
from .features import FeatureCache
from .hardware import Precision, configure_threads, machine_cores, processes_on_machine, resolve_precision
from .preemption import Preempted, StepCheckpoints, StopRequest
from .runlock import RunLock
from .tasks import TASKS, Task


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
             desc: str = "eval", task: str | Task = "classification", progress: bool = True) -> dict[str, Any]:
    """Metrics of a split: classification top-1 with per-class accuracy and confusion matrix, or mIoU."""
    task = task if not isinstance(task, str) else TASKS[task]()
    return task.evaluate(model, loader, num_classes, device, ctx or Dist(), functools.partial(autocast_for, precision,
                                                                                             device), desc, progress)


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


@dataclass
class Run:
    """What one training run holds: built by ``_prepare``, then read by each step of ``_train``."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    ctx: Dist
    quiet: bool
    progress: bool
    precision: Precision
    task: Task                    # what differs between classification and segmentation
    model: nn.Module              # the plain module: checkpoints, adapters and diagnostics use it
    data: TaskData
    train_set: Dataset
    eval_set: Dataset | None
    features: FeatureCache | None  # the linear probe trains its head on features computed once
    base_lr: float
    tuned: list[nn.Parameter]     # what the optimiser trains (and grad_clip clips)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    steps_per_epoch: int          # the loader's length while it starts at step 0 (a resumed epoch starts later)
    eval_loader: DataLoader | None
    diagnostic_images: torch.Tensor | None
    net: nn.Module | None = None         # what the training step runs (DDP, compiled)
    eval_model: nn.Module | None = None  # what evaluation runs (compiled)
    writer: Any = None                   # TensorBoard, where installed

    def lr_at(self, epoch: int, step: int) -> float:
        per_epoch = self.steps_per_epoch
        return lr_at(epoch * per_epoch + step, per_epoch * self.cfg.epochs, per_epoch * self.cfg.warmup_epochs,
                     self.base_lr, self.cfg.schedule)

    def evaluate(self, loader: DataLoader, split: str) -> dict[str, Any]:
        return evaluate(self.eval_model, loader, len(self.data.classes), self.device, self.ctx, self.precision.used,
                        split, self.task, self.progress)


@dataclass
class Progress:
    """How far the run is: what a checkpoint restores."""

    epoch: int = 0                        # epochs done
    step: int = 0                         # steps done inside the next epoch (a checkpoint inside an epoch)
    partial: list[float] | None = None    # that epoch's sums so far (loss, correct, seen, samples)
    log: list[dict] = field(default_factory=list)
    last_eval: tuple[int, dict] | None = None  # (epoch, metrics) of the latest evaluation


@dataclass
class EpochSums:
    """The running sums of one epoch's training loss and accuracy on this process."""

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0     # accuracy units: images or labelled pixels
    samples: float = 0.0

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.seen, self.samples]


def _train(cfg: TrainConfig, out: Path, device, ctx: Dist, resume: bool, quiet: bool, progress: bool,
           stopper: StopRequest, on_epoch=None) -> dict[str, Any]:
    if has_checkpoint(out) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --restart to start it over "
                              "(its files are moved aside, not deleted), or choose another output")
    run = _prepare(cfg, out, device, ctx, quiet, progress)
    done = _restore(run, on_epoch) if resume and has_checkpoint(out) else Progress()
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(_yaml(cfg.to_dict())))
    _wrap(run)
    policy = StepCheckpoints(cfg.checkpoint_every_steps, stopper, ctx, device)
    for epoch in range(done.epoch, cfg.epochs):
        entry = _train_epoch(run, epoch, done, policy, stopper)
        _evaluate_epoch(run, epoch, entry, done)
        _end_epoch(run, epoch, entry, done, stopper, on_epoch)
    return _finish(run, done)


def _prepare(cfg: TrainConfig, out: Path, device, ctx: Dist, quiet: bool, progress: bool) -> Run:
    """Model, data, optimiser and loaders, in the order (and so with the random draws) every run makes them."""
    precision = resolve_precision(cfg.precision, device)
    if ctx.main and not quiet:
        print(f"precision {precision.used} ({precision.reason}); {torch.get_num_threads()} CPU threads", flush=True)
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task]()
    model, data = task.build(cfg)
    model.to(device)
    if ctx.main and not quiet and getattr(data, "description", ""):
        print(f"data: {data.description}", flush=True)
    train_set = input_cache(split_of(data, cfg.train_split), cfg.cache, device)
    eval_set = None if cfg.eval_split == "none" else input_cache(split_of(data, cfg.eval_split), cfg.cache, device)
    features = None
    if task.caches_probe_features and features_mod.cacheable(cfg, ctx, train_set, eval_set):
        features = FeatureCache(model, device, precision.used, functools.partial(autocast_for, precision.used, device))
        train_set, eval_set = features.of(train_set), None if eval_set is None else features.of(eval_set)
    base_lr = cfg.lr * (cfg.batch_size / 256 if cfg.lr_scaling else 1.0)
    tuned = list(model.tuned_parameters().values())
    optimizer = make_optimizer(tuned, cfg, base_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler and device.type == "cuda")
    train_loader = loader_for(train_set, cfg.batch_size, ctx, cfg.seed, True,
                              loader_workers(cfg.workers, device, train_set), pin=pins(train_set, device))
    eval_loader = None if eval_set is None else _eval_loader(cfg, task, eval_set, ctx, device)
    diagnostic_images = None
    if ctx.main:
        diagnostic_images = task.diagnostic_batch(model, eval_set if eval_set is not None else train_set)
    if diagnostic_images is not None:
        diagnostic_images = diagnostic_images.to(device)  # once, not every epoch
    return Run(cfg=cfg, out=out, device=device, ctx=ctx, quiet=quiet, progress=progress, precision=precision,
               task=task, model=model, data=data, train_set=train_set, eval_set=eval_set, features=features,
               base_lr=base_lr, tuned=tuned, optimizer=optimizer, scaler=scaler, train_loader=train_loader,
               steps_per_epoch=len(train_loader.batch_sampler), eval_loader=eval_loader,
               diagnostic_images=diagnostic_images)


def _eval_loader(cfg: TrainConfig, task: Task, dataset, ctx: Dist, device) -> DataLoader:
    return loader_for(dataset, task.eval_batch(max(cfg.batch_size, 256)), ctx, cfg.seed, False,
                      loader_workers(cfg.workers, device, dataset), pin=pins(dataset, device))


def _restore(run: Run, on_epoch=None) -> Progress:
    """The checkpoint's adapter tensors, optimiser and scaler state, and how far it got; refused where the
    config or the precision differ from the run's."""
    cfg, out = run.cfg, run.out
    saved = checkpoint_meta(out).get("config") or {}
    diff = config_differences(saved, cfg)
    if diff:
        raise CheckpointError(f"cannot resume {out}: the config differs from the checkpoint's in {', '.join(diff)}"
                              + resume_hint(saved, diff))
    used = checkpoint_meta(out).get("precision")
    if used and used != run.precision.used:  # precision: auto resolves per machine
        raise CheckpointError(f"cannot resume {out}: it was trained in {used}, and precision "
                              f"{cfg.precision!r} means {run.precision.used} on this machine; set precision={used}")
    tensors, meta = load_checkpoint(out, run.optimizer)
    expected = run.model.adapter_tensors()
    wrong = sorted(n for n, t in expected.items() if n not in tensors or tensors[n].shape != t.shape)
    if wrong:
        raise CheckpointError(f"checkpoint in {out} does not fit the model: {', '.join(wrong[:5])}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(tensors[name])
    done = Progress(meta["epoch"], meta.get("step") or 0, meta.get("partial"), meta["log"])
    if meta.get("grad_scaler"):
        run.scaler.load_state_dict(meta["grad_scaler"])
    if run.ctx.main and not run.quiet:
        print(f"resuming {out} after epoch {done.epoch}" + (f", step {done.step}" if done.step else ""))
    for entry in done.log if on_epoch else ():
        on_epoch(entry)
    return done


def _wrap(run: Run) -> None:
    """DDP and torch.compile around the model: the training step through DDP (compiled, as PyTorch
    recommends), evaluation on the model itself; the linear probe on cached features runs its head alone."""
    cfg, ctx = run.cfg, run.ctx
    if ctx.active and run.device.type == "cuda":
        run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)  # decoder BatchNorm: the global batch
    net = DistributedDataParallel(run.model) if ctx.active else run.model
    run.net, run.eval_model = compile_model(net, cfg.compile), compile_model(run.model, cfg.compile)
    if run.features is not None:
        run.net = run.eval_model = run.features.head
        if cfg.compile and ctx.main and not run.quiet:
            print("compile: the linear probe trains its head on cached features; there is nothing to compile",
                  flush=True)
    run.writer = _tensorboard(run.out) if ctx.main else None


def _checkpoint(run: Run, done: Progress, epochs_done: int, step: int = 0, sums: list[float] | None = None) -> None:
    if run.ctx.main:
        save_checkpoint(run.out, run.model.adapter_tensors(), run.optimizer,
                        {"epoch": epochs_done, "step": step, "partial": sums, "log": done.log,
                         "config": run.cfg.to_dict(), "precision": run.precision.used,
                         "grad_scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None})
    run.ctx.barrier()


def _train_epoch(run: Run, epoch: int, done: Progress, policy: StepCheckpoints, stopper: StopRequest) -> dict:
    """One epoch of optimiser steps (from a resumed step where the checkpoint lies inside it); its log entry."""
    cfg, ctx, loader = run.cfg, run.ctx, run.train_loader
    run.net.train()
    first = done.step if epoch == done.epoch else 0
    loader.batch_sampler.set_epoch(epoch)
    loader.batch_sampler.start = first
    _seed_step(cfg, epoch, -1, ctx)  # creating the loader's iterator draws its workers' seeds
    batches = iter(loader)
    _seed_step(cfg, epoch, first, ctx)
    # a run resumed inside an epoch: rank 0 carries the epoch's sums so far, the others start at 0
    sums = EpochSums(*(done.partial if first and done.partial and ctx.main else [0.0, 0.0, 0.0, 0.0]))
    started = time.time()
    bar = tqdm_or_lines(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", total=len(loader),
                        leave=False, disable=not run.progress or not ctx.main)
    per_epoch = run.steps_per_epoch
    for step, (images, labels) in enumerate(bar, start=first):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(epoch, step)
        _train_step(run, images, labels, len(loader.batch_sampler.global_batches()[step]), sums)
        if sums.seen:
            bar.set_postfix(loss=f"{sums.loss / sums.samples:.3f}", acc=f"{sums.correct / sums.seen:.3f}")
        _seed_step(cfg, epoch, step + 1, ctx)  # the next batch's draws, the same after a resume here
        action = policy.after_step(epoch * per_epoch + step + 1, step + 1 == per_epoch)
        if action:
            _checkpoint(run, done, epoch, step + 1, ctx.all_sum(sums.as_list(), run.device))
            if action == "stop":
                raise Preempted(f"stopped by {stopper.signal or 'a signal'} after step {step + 1}/{per_epoch} "
                                f"of epoch {epoch + 1}; checkpoint written: continue with --resume", str(run.out))
    loader.batch_sampler.start = 0
    loss, correct, seen, samples = ctx.all_sum(sums.as_list(), run.device)
    return {"epoch": epoch + 1, "train_loss": loss / samples, run.task.train_accuracy: correct / seen,
            "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 3)}


def _train_step(run: Run, images, labels, global_count: int, sums: EpochSums) -> None:
    """One optimiser step on this process's share of a global batch, in ``accumulation`` micro-batches."""
    cfg, ctx, device = run.cfg, run.ctx, run.device
    micro = list(zip(images.chunk(cfg.accumulation), labels.chunk(cfg.accumulation)))
    for i, (x, y) in enumerate(micro):
        x, y = to_device(x, run.train_set, device), y.to(device, non_blocking=run.train_loader.pin_memory)
        sync = i == len(micro) - 1
        with (run.net.no_sync() if ctx.active and not sync else contextlib.nullcontext()):
            with autocast_for(run.precision.used, device):
                logits = run.net(x).float()
            loss = run.task.per_sample_loss(logits, y, cfg).sum()
            # sum / global batch, times world because DDP averages gradients over processes
            run.scaler.scale(loss * ctx.world / global_count).backward()
        sums.loss += loss.item()
        hit, units = run.task.hits(logits, y)
        sums.correct, sums.seen, sums.samples = sums.correct + hit, sums.seen + units, sums.samples + len(y)
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.tuned, cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _evaluate_epoch(run: Run, epoch: int, entry: dict, done: Progress) -> None:
    """The eval split every ``eval_every`` epochs and after the last, and the method's diagnostics, into the
    epoch's log entry."""
    cfg = run.cfg
    last_epoch = epoch + 1 == cfg.epochs
    if run.eval_loader is not None and (last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
        metrics = run.evaluate(run.eval_loader, cfg.eval_split)
        done.last_eval = (epoch + 1, metrics)
        entry.update({f"{cfg.eval_split}_{key}": metrics[key] for key in (run.task.primary, "loss") if key in metrics})
    if run.diagnostic_images is not None:  # DA's weight, AR's gamma and AR's relative change per transition
        from ..explain import epoch_diagnostics

        entry.update(epoch_diagnostics(run.model, run.diagnostic_images))


def _end_epoch(run: Run, epoch: int, entry: dict, done: Progress, stopper: StopRequest, on_epoch=None) -> None:
    """Log the epoch, checkpoint after it, and stop there if a signal asked to during the evaluation."""
    ctx = run.ctx
    done.log.append(entry)
    _checkpoint(run, done, epoch + 1)
    if ctx.main:
        _write_log(run.out, done.log)
        if run.writer:
            for key, value in entry.items():
                if key != "epoch":
                    run.writer.add_scalar(key, value, epoch + 1)
        if not run.quiet:
            print(json.dumps(entry), flush=True)
    if on_epoch is not None:
        on_epoch(entry)
    if epoch + 1 != run.cfg.epochs and stopper.agreed(ctx, run.device):
        raise Preempted(f"stopped by {stopper.signal or 'a signal'} after epoch {epoch + 1}; checkpoint written: "
                        "continue with --resume", str(run.out))


def _finish(run: Run, done: Progress) -> dict[str, Any]:
    """The final evaluation (the last epoch's, unless a finished run is resumed), the test split, the adapter
    and results.json."""
    cfg, task = run.cfg, run.task
    results = {"config": cfg.to_dict(), "task": task.name, "primary_metric": task.primary,
               "classes": run.data.classes, "precision": run.precision.to_dict(), "threads": torch.get_num_threads(),
               "data_description": getattr(run.data, "description", ""),
               "epochs_run": len(done.log), "parameters": task.parameters(run.model), "log": done.log}
    if run.eval_loader is not None and done.log:
        last = done.last_eval
        results[cfg.eval_split] = (last[1] if last and last[0] == len(done.log) else
                                   run.evaluate(run.eval_loader, cfg.eval_split))
    if cfg.test_split:
        results["test"] = _test_metrics(run)
    if run.ctx.main:
        _save_outputs(run, results)
    run.ctx.barrier()
    return results


def _test_metrics(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    test_set = input_cache(split_of(run.data, cfg.test_split), cfg.cache, run.device)
    if run.features is not None and features_mod.cacheable(cfg, run.ctx, test_set):
        test_set = run.features.of(test_set)
    elif run.features is not None:  # a test split that is not cached: the whole model on its images
        run.eval_model = compile_model(run.model, cfg.compile)
    return run.evaluate(_eval_loader(cfg, run.task, test_set, run.ctx, run.device), "test")


def _save_outputs(run: Run, results: dict) -> None:
    """The adapter (its card shows the effective recipe and the command line that ran it) and results.json."""
    cfg, out = run.cfg, run.out
    summary = {k: results[k][run.task.primary] for k in (cfg.eval_split, "test") if k in results}
    record = run.task.adapter_record(cfg, run.model, run.data)
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None
    run.model.save_adapter(out / "adapter", metrics=summary, data=record.pop("data"), training_config=cfg.to_dict(),
                           command=command, **record)
    results["adapter"] = str(out / "adapter")
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    if run.writer:
        run.writer.close()


def _seed_step(cfg: TrainConfig, epoch: int, step: int, ctx: Dist) -> None:
    """Seed the draws of one step (prompt dropout, augmentation): the same after a resume at that step,
    different per process."""
    torch.manual_seed(cfg.seed * 1009 + epoch * 7919 + (step + 1) * 104_729 + ctx.rank * 1_000_003)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
