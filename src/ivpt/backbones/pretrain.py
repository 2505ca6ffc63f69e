"""Supervised pretraining of the shipped default backbone on CIFAR-10 (train split only).

    python -m ivpt.backbones.pretrain --out runs/pretrain

Resumable: a checkpoint is written atomically after every epoch and picked up on restart. Each
epoch's shuffling, augmentation and drop-path draw from generators seeded by (seed, epoch), so a
resumed run follows the same path as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import os
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from ..progress import progress as tqdm_or_lines

from ..data.cifar10 import load_cifar10
from ..data.paths import data_file, sha256_file
from ..engine.checkpoint import atomic_write, has_checkpoint, load_checkpoint, save_checkpoint
from ..engine.hardware import Precision, resolve_precision
from ..engine.preemption import Preempted, StopRequest, decode_state, encode_state, rng_state, set_rng_state
from ..engine.runlock import RunLock
from .architectures import ARCHITECTURES


def parse_args(argv=None, prog: str | None = None):
    from ..cliparse import Parser

    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, type=os.path.expanduser,
                   help="cifar10-jpg.tar.gz (default: $IVPT_DATA or ../shared/data)")
    p.add_argument("--out", required=True, type=os.path.expanduser, help="run folder: checkpoints, log, final weights")
    p.add_argument("--arch", default="vit_mini_patch4_32", choices=sorted(ARCHITECTURES))
    p.add_argument("--width", type=int, default=None, help="override the architecture's embed_dim")
    p.add_argument("--depth", type=int, default=None, help="override the architecture's depth")
    p.add_argument("--heads", type=int, default=None, help="override the architecture's num_heads")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.05)
    p.add_argument("--crop-padding", type=int, default=4)
    p.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="no random horizontal flips (flips teach left/right invariance, which hides position)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype of the forward pass; auto: bf16 where the device computes it natively "
                        "(CUDA with bf16, CPUs with AVX512_BF16 or AMX), else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "width", "depth", "heads", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:  # threads 0 would read as all cores
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.crop_padding < 0:
        p.error(f"--crop-padding must be 0 or more, got {args.crop_padding}")
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error(f"--warmup-epochs must be in [0, epochs), got {args.warmup_epochs}")
    return args


def build_model(args) -> VisionTransformer:
    cfg = dict(ARCHITECTURES[args.arch])
    for key, attr in (("embed_dim", "width"), ("depth", "depth"), ("num_heads", "heads")):
        if getattr(args, attr) is not None:
            cfg[key] = getattr(args, attr)
    return VisionTransformer(num_classes=10, drop_path_rate=args.drop_path, **cfg), cfg


def augment(batch: torch.Tensor, pad: int, gen: torch.Generator, hflip: bool = True) -> torch.Tensor:
    """Random crop after reflect padding plus (optionally) horizontal flip, vectorised over the batch (N,C,H,W)."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(batch.shape[1])[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def lr_at(step: float, total: float, warmup: float, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1.0, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def save_state(out: Path, model, opt, epoch: int, log: list, inside: dict | None = None,
               precision: str | None = None) -> None:
    """A checkpoint after ``epoch`` epochs; ``inside``: step, sums and generator states within the next one."""
    save_checkpoint(out, model.state_dict(), opt, {"epoch": epoch, "log": log, "inside": inside, "precision": precision})


def resumed_precision(asked: str, resolved: Precision, recorded: str | None, out: Path) -> Precision:
    """A resumed run keeps the precision it began in: ``auto`` on another machine must not switch it mid-run."""
    if recorded is None or recorded == resolved.used:
        return resolved
    if asked == "auto":
        return Precision(asked, recorded, f"resumed: the checkpoint in {out} was trained in {recorded}")
    raise SystemExit(f"--precision {asked}: the checkpoint in {out} was trained in {recorded}; resume it with "
                     f"--precision {recorded} (or auto), or start a new --out")


def load_state(out: Path, model, opt) -> tuple[int, list, dict | None, str | None]:
    tensors, meta = load_checkpoint(out, opt)
    model.load_state_dict(tensors)
    return meta["epoch"], meta["log"], meta.get("inside"), meta.get("precision")


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, mean, std, device, batch=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = (images[i:i + batch].to(device).float() / 255 - mean) / std
        correct += (model(x).argmax(-1).cpu() == labels[i:i + batch]).sum().item()
    return correct / len(images)


def main(argv=None, prog: str | None = None) -> dict:
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    with RunLock(out):  # one pretraining per folder: a second one fails at once, naming the holder
        return _pretrain(args, out, device)


def _pretrain(args, out: Path, device: torch.device) -> dict:
    tar = Path(args.data) if args.data else data_file("cifar10-jpg.tar.gz")
    data = load_cifar10(tar)
    train_x = torch.from_numpy(data["train"].images).permute(0, 3, 1, 2).contiguous()
    train_y = torch.from_numpy(data["train"].labels)
    mean_list = (train_x.float().mean(dim=(0, 2, 3)) / 255).tolist()
    std_list = (train_x.float().std(dim=(0, 2, 3)) / 255).tolist()
    mean = torch.tensor(mean_list, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_list, device=device).view(1, 3, 1, 1)

    torch.manual_seed(args.seed)
    model, arch = build_model(args)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    start, log, inside, recorded = 0, [], None, None
    if has_checkpoint(out):
        start, log, inside, recorded = load_state(out, model, opt)
        print(f"resuming from epoch {start}" + (f", step {inside['step']}" if inside else "") + f" in {out}")
    precision = resolve_precision(args.precision, device)
    if precision.used == "fp16":  # pretraining has no gradient scaler: fp32 rather than unscaled fp16
        precision = Precision(args.precision, "fp32", "CUDA device without bf16; pretraining runs fp16 nowhere")
    precision = resumed_precision(args.precision, precision, recorded, out)
    print(f"precision {precision.used} ({precision.reason})", flush=True)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision.used == "bf16")

    data_tensors = (train_x, train_y, mean, std)
    with StopRequest() as stopper:  # SIGTERM / SIGUSR1: checkpoint after the current step, then stop
        _epochs(args, out, model, opt, data_tensors, start, log, inside, stopper, autocast, device, precision.used)
    return _finish(args, out, model, data, tar, arch, mean_list, std_list, log, precision, mean, std)


def _epochs(args, out, model, opt, data_tensors, start, log, inside, stopper, autocast, device, precision) -> None:
    train_x, train_y, mean, std = data_tensors
    steps_per_epoch = len(train_x) // args.batch_size  # drop the ragged last batch
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch * args.warmup_epochs
    for epoch in range(start, args.epochs):
        model.train()
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        torch.manual_seed(args.seed * 100003 + epoch)  # drop-path draws
        order = torch.randperm(len(train_x), generator=gen)
        t0, loss_sum, correct, seen, first = time.time(), 0.0, 0, 0, 0
        if inside and epoch == start:  # resumed inside this epoch: the same order, draws and sums as before
            first, (loss_sum, correct, seen) = inside["step"], inside["sums"]
            gen.set_state(decode_state(inside["generator"]))
            set_rng_state(inside["rng"])
        bar = tqdm_or_lines(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for it in bar:
            idx = order[it * args.batch_size:(it + 1) * args.batch_size]
            x = augment(train_x[idx].float() / 255, args.crop_padding, gen, args.hflip).to(device)
            x = (x - mean) / std
            y = train_y[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + it, total, warmup, args.lr, args.min_lr)
            with torch.autocast(**autocast):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if stopper.requested:
                save_state(out, model, opt, epoch, log, {"step": it + 1, "sums": [loss_sum, correct, seen],
                                                         "generator": encode_state(gen.get_state()), "rng": rng_state()},
                           precision)
                raise Preempted(f"pretraining stopped by {stopper.signal} after step {it + 1}/{steps_per_epoch} of "
                                f"epoch {epoch + 1}; checkpoint written in {out}: run the same command to resume", str(out))
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                 "lr_end": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        save_state(out, model, opt, epoch + 1, log, precision=precision)


def _finish(args, out, model, data, tar, arch, mean_list, std_list, log, precision, mean, std) -> dict:
    test_x = torch.from_numpy(data["test"].images).permute(0, 3, 1, 2).contiguous()
    test_y = torch.from_numpy(data["test"].labels)
    model.to("cpu")
    acc = evaluate(model, test_x, test_y, mean.cpu(), std.cpu(), torch.device("cpu"))
    print(f"CIFAR-10 test top-1 (fp32, 10,000 images): {acc:.4f}")
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "weights.safetensors", lambda tmp: save_file(weights, str(tmp)))
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "data", "device", "threads")}
    config = {
        "architecture": {"arch": args.arch, **arch},
        "num_classes": 10,
        "input_size": [3, arch["img_size"], arch["img_size"]],
        "mean": mean_list,
        "std": std_list,
        "interpolation": "bicubic",
        "class_names": data["train"].classes,
        "recipe": {**recipe, "precision_used": precision.used, "optimizer": "AdamW", "schedule": "linear warm-up + cosine (per step)",
                   "augmentation": f"reflect-pad {args.crop_padding} random crop"
                                   + (" + horizontal flip" if args.hflip else " (no flips)"),
                   "device": args.device, "torch": torch.__version__},
        "train_log": log,
        "cifar10_test_top1": acc,
        "data": {"file": tar.name, "sha256": sha256_file(tar), "train_images": len(data["train"].labels)},
        "weights_sha256": sha256_file(out / "weights.safetensors"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


if __name__ == "__main__":
    main()
