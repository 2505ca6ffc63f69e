"""E2VPT's pruning and rewinding (method ``e2vpt`` with ``prune: true``), as its code runs them
(ChengHan111/E2VPT: ``src/engine/trainer.py`` ``calculate_importance``, ``determine_mask_sequence``,
``what_tokens_to_mask``, ``what_tokens_pieces_to_mask``; ``tune_vtab_PruningRewind_CVK.py``).

After the grid's choice, the chosen grid run (trained with learned scales on its input prompts' tokens
and pieces) is scored: each scale's importance is the gradient of the loss with respect to it, averaged
over one pass of the train split. The lowest-scored tokens, and per token the lowest-scored pieces, are
pruned at every level of a fixed schedule; each (token level, piece level) pair is rewound: trained anew
from the initialisation with those masks fixed, train -> val, at the chosen lr and weight decay. The
best val decides the masks the seeds are trained with. ``ivpt.engine.study`` runs the rewinds as one
stage, shared by workers like the grid.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import TrainConfig

PRUNE_PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # CLS_TOKEN_MASK_PERCENT, CLS_TOKEN_PIECE_MASK_PERCENT
MIN_TOKENS = 1  # MIN_NUMBER_CLS_TOKEN: tokens every level keeps
MIN_PIECES = 4  # MIN_NUMBER_CLS_TOKEN_PIECE: pieces every level keeps of each token


def prunes(cfg: TrainConfig) -> bool:
    """Whether the protocol runs the pruning stage for this recipe."""
    return cfg.method == "e2vpt" and bool(cfg.method_options.get("prune"))


def warn_single_run(cfg: TrainConfig) -> None:
    """``ivpt train`` / ``ivpt.train`` of a recipe that asks for pruning: said once, since one run is the first
    stage only (the protocol's tune runs the rest)."""
    if prunes(cfg):
        import warnings

        warnings.warn("method e2vpt with prune: true: a single run trains the first stage only (the prompts with "
                      "learned token and piece masks); the scoring, the rewinds and the seeds run in ivpt tune "
                      "(docs/method.md, E2VPT)", stacklevel=3)


def mask_counts(total: int, percents=PRUNE_PERCENTS, minimum: int = 0) -> list[int]:
    """The levels (how many of ``total`` are pruned), as determine_mask_sequence makes them: int(total * pct / 100)
    per percentage, the first one above total - minimum cut to it and the rest dropped; each level once."""
    counts = []
    for percent in percents:
        count = int(total * percent / 100)
        if minimum > 0 and count > total - minimum:
            counts.append(total - minimum)
            break
        counts.append(count)
    return sorted(set(counts))


def levels(cfg: TrainConfig, prompt_length: int, pieces: int) -> tuple[list[int], list[int]]:
    """The recipe's token levels and piece levels (``protocol.prune_percents``, the code's minima kept)."""
    percents = cfg.protocol.get("prune_percents", PRUNE_PERCENTS)
    return mask_counts(prompt_length, percents, MIN_TOKENS), mask_counts(pieces, percents, MIN_PIECES)


def lowest(scores: list[float], count: int) -> list[int]:
    """The indices of the ``count`` lowest scores (ties: the lower index, as the code's stable sort)."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:count])


def masks_at(token_scores: list[float], piece_scores: list[list[float]], tokens: int, pieces: int) -> dict:
    """The method options of the rewound model that prunes ``tokens`` tokens and ``pieces`` pieces of every token."""
    return {"pruned_tokens": lowest(token_scores, tokens),
            "pruned_pieces": [lowest(row, pieces) for row in piece_scores]}


def importance(cfg: TrainConfig, adapter: Path) -> tuple[list[float], list[list[float]]]:
    """The mean over the train split's batches of d loss / d scale, for the token scales (p) and the piece
    scales (p x pieces) of the model ``adapter`` holds, trained by ``cfg`` (the chosen grid run).

    In eval mode, as the code scores; the code's pass also steps its optimiser (a side effect of reusing its
    training step), ivpt scores the trained model as it is.
    """
    import torch

    from ..adapter_format import read_adapter_config, read_adapter_tensors
    from .data import split_of
    from .distributed import Dist
    from .loop import autocast_for, loader_for, resolve_device
    from .hardware import resolve_precision
    from .tasks import TASKS

    device = resolve_device(cfg.device)
    task = TASKS[cfg.task]()
    torch.manual_seed(cfg.seed)
    model, data = task.build(cfg)
    tensors = read_adapter_tensors(adapter, read_adapter_config(adapter))
    missing = set(model.tuned_parameters()) - set(tensors)
    if missing:
        raise ValueError(f"{adapter}: the chosen grid run's adapter lacks {sorted(missing)[0]}; it is not a run of "
                         "this recipe (remove the run folder to train it again)")
    model.load_state_dict(tensors, strict=False)
    model.to(device).eval()
    scales = [model.method.token_scales, model.method.piece_scales]
    sums = [torch.zeros_like(s, dtype=torch.float64) for s in scales]
    loader = loader_for(split_of(data, cfg.train_split), cfg.batch_size, Dist(), cfg.seed, True, 0)
    batches = 0
    # fp16 has no loss scaling here: small gradients would round to zero and tie, so it scores in fp32
    precision = resolve_precision(cfg.precision, device).used
    precision = "fp32" if precision == "fp16" else precision
    for images, labels in loader:
        # the batch's mean loss in the training step's micro-batches (``accumulation``), so what trained fits here
        for x, y in zip(images.chunk(cfg.accumulation), labels.chunk(cfg.accumulation)):
            x, y = x.to(device), y.to(device)
            with autocast_for(precision, device):
                logits = model(x).float()
            loss = task.per_sample_loss(logits, y, cfg).sum() / len(labels)
            for total, grad in zip(sums, torch.autograd.grad(loss, scales)):
                total += grad.double()
        batches += 1
    token_scores, piece_scores = (s / max(batches, 1) for s in sums)
    return token_scores.tolist(), piece_scores.tolist()


def scored(cfg: TrainConfig, adapter: Path, folder: Path) -> dict:
    """``importance`` once per chosen run: the first worker scores under the folder's lock and every worker
    reads its file (a GPU's scores may differ in their last bits between two passes; the rewinds must all start
    from one set). A file that scored another run is refused, never reused."""
    from .checkpoint import atomic_write
    from .config import ConfigError
    from .runlock import RunLock, RunLockedError

    path = folder / "importance.json"
    while not path.is_file():
        try:
            lock = RunLock(folder).acquire()
        except RunLockedError:  # another worker scores: wait for its file
            time.sleep(2)
            continue
        try:
            if not path.is_file():
                tokens, pieces = importance(cfg, adapter)
                record = {"scored": str(adapter), "token_scores": tokens, "piece_scores": pieces}
                atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        finally:
            lock.release()
    scores = json.loads(path.read_text())
    if scores.get("scored") != str(adapter):
        raise ConfigError(f"{path} holds the scores of {scores.get('scored')}, not of the chosen run {adapter}: "
                          "remove that folder (its rewinds too) or use another output")
    return scores


def stage_folder(out: Path, kind: str, choice: dict) -> Path:
    """``OUTPUT/pruning/lrL_wdW`` or ``OUTPUT/rewind/lrL_wdW``: a stage per choice, so another choice (another
    pruner, say) scores and rewinds anew instead of meeting the first choice's runs."""
    return out / kind / f"lr{choice['lr']:g}_wd{choice['weight_decay']:g}"


def rewind_jobs(cfg: TrainConfig, out: Path, choice: dict, scores: dict) -> dict[tuple, tuple[Path, TrainConfig]]:
    """(pieces, tokens) -> (run folder, config) of every rewind: train -> val at the choice, masks fixed."""
    token_levels, piece_levels = levels(cfg, len(scores["token_scores"]), len(scores["piece_scores"][0]))
    jobs = {}
    for tokens in token_levels:
        for pieces in piece_levels:
            run = stage_folder(out, "rewind", choice) / f"tokens{tokens}_pieces{pieces}"
            options = {**cfg.method_options, "prune": False,
                       **masks_at(scores["token_scores"], scores["piece_scores"], tokens, pieces)}
            jobs[(pieces, tokens)] = (run, dataclasses.replace(
                cfg, lr=choice["lr"], weight_decay=choice["weight_decay"], method_options=options, train_split="train",
                eval_split="val", test_split=None, output=str(run)))
    return jobs


def choose_rewind(values: dict[tuple, float]) -> tuple:
    """The (pieces, tokens) with the best val; ties: more tokens pruned (the code's rule), then more pieces."""
    return max(values, key=lambda point: (round(values[point], 6), point[1], point[0]))
