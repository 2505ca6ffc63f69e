"""What a prompt-tuned model does on given images: saliency, AR's selection, DA's mixing, AR's size.

``explain(model, images)`` runs one traced forward pass (``model.forward_explained``, which returns what
the encoder computed on the way; nothing is recorded otherwise) and returns an ``Explanation``: per image
the prediction and, for every block, the saliency that AR uses (the class token's attention over the
patch grid, averaged over heads; the prompts' attention for ``ar_source="prompts"``) with the
patches AR reinforced after it; per transition DA's mixing weight (static: sigmoid(theta);
gate/channel: its values over the images' prompt tokens), AR's gamma and the size of AR's change
relative to the patch tokens. VPT-deep and VPT-shallow get the same attention maps (they have no
DA and no AR), so methods compare side by side. ``plot_image`` and ``plot_adapter`` draw them
(matplotlib: ``pip install 'ivpt[explain]'``); ``ivpt explain`` does all of it from the command line.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .encoder import EncoderTrace, PromptedViT


@dataclass
class TransitionStats:
    """Learned per-transition quantities (transition i sits between block i and block i+1)."""

    transition: int
    da_mode: str | None = None          # None: no connection here (VPT-deep, or cdc=False)
    da_weight: float | None = None      # static: sigmoid(theta); gate/channel: mean over tokens (and channels)
    da_weights: list[float] | None = None  # gate/channel: every value over the given images' prompt tokens
    da_start: float | None = None       # the weight at initialisation: sigmoid(bias init) (w = 0)
    gamma: float | None = None          # AR's gamma (None: AR does not act here)
    ratio: float | None = None          # mean over images of |gamma r| / |E_j| over the reinforced patches


@dataclass
class ImageExplanation:
    prediction: str | None              # classification: the top-1 class; segmentation: None
    score: float | None                 # its softmax probability
    saliency: dict[int, np.ndarray]     # block -> (grid_h, grid_w) attention fractions over the patches
    selected: dict[int, list[int]]      # transition -> row-major indices of the patches AR reinforced
    ratio: dict[int, float]             # transition -> |gamma r| / |E_j| over this image's reinforced patches
    mask: np.ndarray | None = None      # segmentation: the predicted class per pixel


@dataclass
class Explanation:
    method: str
    options: dict[str, Any]
    task: str
    grid: tuple[int, int]
    image_size: tuple[int, int]
    class_names: list[str] | None
    images: list[ImageExplanation]
    transitions: list[TransitionStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every number as a number, arrays as nested lists."""
        def image(e: ImageExplanation) -> dict:
            out = {"prediction": e.prediction, "score": e.score,
                   "saliency": {str(b): s.round(6).tolist() for b, s in e.saliency.items()},
                   "selected": {str(t): v for t, v in e.selected.items()},
                   "reinforcement_ratio": {str(t): v for t, v in e.ratio.items()}}
            if e.mask is not None:
                counts = np.bincount(e.mask.ravel(), minlength=len(self.class_names or []) or int(e.mask.max()) + 1)
                out["mask_class_fractions"] = (counts / counts.sum()).round(6).tolist()
            return out

        return {"method": self.method, "options": self.options, "task": self.task, "grid": list(self.grid),
                "image_size": list(self.image_size), "class_names": self.class_names,
                "transitions": [asdict(t) for t in self.transitions], "images": [image(e) for e in self.images]}


def encoder_of(model: nn.Module) -> PromptedViT:
    """The prompted encoder of a classification model (itself) or a segmentation model."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, PromptedViT):
        raise TypeError(f"explain needs an ivpt model (PromptedViT or SegmentationModel), got {type(model).__name__}")
    return encoder


def transition_stats(encoder: PromptedViT, trace: EncoderTrace) -> list[TransitionStats]:
    """DA's weight and AR's gamma from the method's own tensors; gate/channel DA's values and AR's relative
    change from a traced pass (``trace``)."""
    method = encoder.method
    aggregation = getattr(method, "aggregation", {})
    reinforcement = getattr(method, "reinforcement", {})
    bias_init = getattr(method.config, "da_bias_init", 0.0)
    stats = []
    for i in range(len(encoder.backbone.blocks) - 1):
        row = TransitionStats(i)
        if str(i) in aggregation:
            da = aggregation[str(i)]
            row.da_mode = da.mode
            if da.mode == "static":
                row.da_weight = float(torch.sigmoid(da.theta.detach()).item())
                row.da_start = 1 / (1 + math.exp(-bias_init))
            elif da.mode in ("gate", "channel"):
                row.da_start = 1 / (1 + math.exp(-bias_init))
                if i in trace.da_weights:
                    values = trace.da_weights[i].float().flatten().cpu()
                    row.da_weight = float(values.mean().item())
                    row.da_weights = [round(float(v), 6) for v in values.tolist()]
        if str(i) in reinforcement:
            row.gamma = float(reinforcement[str(i)].gamma.detach().item())
            if i in trace.reinforcement_ratio:
                row.ratio = float(trace.reinforcement_ratio[i].float().mean())
        stats.append(row)
    return stats


@torch.no_grad()
def explain(model: nn.Module, images: torch.Tensor, class_names: list[str] | None = None) -> Explanation:
    """One traced forward pass over normalised ``images`` (B, 3, H, W), in eval mode (the model's mode is
    restored after)."""
    encoder = encoder_of(model)
    was_training = model.training
    model.eval()
    try:
        result = model.forward_explained(images)
    finally:
        model.train(was_training)
    output, trace = result.output, result.trace
    ph, pw = encoder.backbone.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    segmentation = getattr(model, "task", "classification") == "segmentation"
    names = class_names or getattr(model, "class_names", None)
    if not segmentation:
        scores, index = output.float().softmax(-1).max(-1)
    explained = []
    for b in range(images.shape[0]):
        saliency = {i: s[b].float().reshape(grid).cpu().numpy() for i, s in trace.saliency.items()}
        selected = {i: sorted(s[b].tolist()) for i, s in trace.selected.items()}
        ratio = {i: float(r[b]) for i, r in trace.reinforcement_ratio.items()}
        if segmentation:
            explained.append(ImageExplanation(None, None, saliency, selected, ratio,
                                              mask=output[b].argmax(0).cpu().numpy()))
        else:
            label = int(index[b])
            explained.append(ImageExplanation(names[label] if names else str(label), float(scores[b]),
                                              saliency, selected, ratio))
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(encoder.method.config).items()}
    return Explanation(encoder.method.name, options, "segmentation" if segmentation else "classification", grid,
                       tuple(images.shape[-2:]), list(names) if names else None, explained,
                       transition_stats(encoder, trace))


def epoch_diagnostics(encoder: PromptedViT, images: torch.Tensor) -> dict[str, float]:
    """Flat per-transition figures for training logs: da_weight_i, ar_gamma_i, ar_ratio_i."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            _, trace = encoder.forward_traced(images)
    finally:
        encoder.train(was_training)
    out = {}
    for row in transition_stats(encoder, trace):
        for key, value in (("da_weight", row.da_weight), ("ar_gamma", row.gamma), ("ar_ratio", row.ratio)):
            if value is not None:
                out[f"{key}_{row.transition}"] = round(value, 6)
    return out


def denormalize(images: torch.Tensor, mean, std) -> np.ndarray:
    """(B, 3, H, W) normalised tensors back to (B, H, W, 3) uint8 for display."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("ivpt explain draws its figures with matplotlib: pip install 'ivpt[explain]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_image(explanation: Explanation, index: int, pixels: np.ndarray, path: str | Path,
               title: str | None = None, evidence: tuple[float, float, float, float] | None = None) -> dict[int, list[int]]:
    """One PNG: the input, then every block's saliency over it with AR's reinforced patches outlined.

    ``evidence``: a known box (x0, y0, x1, y1, fractions of the image) drawn on the input, e.g. the
    target of a mechanism task. Returns block -> the patch indices outlined, exactly as drawn.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    e = explanation.images[index]
    blocks = sorted(e.saliency)
    panels = 1 + len(blocks) + (e.mask is not None)
    cols = min(panels, 7)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols + 1.0, 1.9 * rows + 0.7), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    height, width = pixels.shape[:2]
    gh, gw = explanation.grid
    cell_h, cell_w = height / gh, width / gw
    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title("input", fontsize=9)
    if evidence is not None:
        x0, y0, x1, y1 = evidence
        axes.flat[0].add_patch(Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height,
                                         fill=False, edgecolor="lime", lw=1.5))
    vmax = max((float(s.max()) for s in e.saliency.values()), default=1.0) or 1.0
    outlined: dict[int, list[int]] = {}
    image = None
    for n, block in enumerate(blocks, start=1):
        ax = axes.flat[n]
        ax.imshow(pixels)
        image = ax.imshow(e.saliency[block], cmap="inferno", alpha=0.6, vmin=0, vmax=vmax,
                          extent=(0, width, height, 0), interpolation="bilinear")
        chosen = e.selected.get(block, [])
        for j in chosen:
            r, c = divmod(j, gw)
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan", lw=1.0))
        if chosen:
            outlined[block] = list(chosen)
        ax.set_title(f"block {block}" + (f": AR top-{len(chosen)}" if chosen else ""), fontsize=9)
    if e.mask is not None:
        from .palette import palette

        colours = np.array(palette(int(e.mask.max()) + 1), dtype=np.uint8)
        axes.flat[1 + len(blocks)].imshow(colours[e.mask])
        axes.flat[1 + len(blocks)].set_title("predicted mask", fontsize=9)
    heading = title or explanation.method
    if e.prediction is not None:
        heading += f" | prediction: {e.prediction} ({e.score:.2f})"
    fig.suptitle(heading, fontsize=10)
    handles = [Patch(facecolor="none", edgecolor="cyan", label="patch reinforced by AR")] if outlined else []
    if evidence is not None:
        handles.append(Patch(facecolor="none", edgecolor="lime", label="the evidence (known to the generator)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower left", fontsize=8, frameon=False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, pad=0.01)
        bar.set_label("saliency (attention to the patch)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return outlined


def plot_adapter(explanation: Explanation, path: str | Path, title: str | None = None) -> None:
    """One PNG of the learned per-transition quantities: DA's weight, AR's gamma, AR's relative size."""
    plt = _pyplot()
    rows = explanation.transitions
    xs = [r.transition for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    spread = [(r.transition, r.da_weights) for r in rows if r.da_weights]
    if spread:
        ax.boxplot([w for _, w in spread], positions=[t for t, _ in spread], widths=0.6, showfliers=False)
    fixed = [(r.transition, r.da_weight) for r in rows if r.da_weight is not None and not r.da_weights]
    if fixed:
        ax.plot(*zip(*fixed), "o-", label="sigmoid(theta) (static)")
    starts = [r.da_start for r in rows if r.da_start is not None]
    if starts:
        ax.axhline(starts[0], color="grey", ls="--", lw=1, label=f"at initialisation ({starts[0]:.2f})")
        ax.set_ylim(-0.02, 1.02)
        if spread:
            ax.plot([], [], color="black", label="values over the images' prompt tokens")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no cross-layer connection\n(prompts of each block independent)", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    ax.set_title("DA: weight of the previous block's prompts (alpha)", fontsize=9)
    ax.set_xlabel("transition (block i -> i+1)")
    ax.set_ylabel("alpha")
    for ax, key, name, label in ((axes[1], "gamma", "AR: gamma", "gamma"),
                                 (axes[2], "ratio", "AR: |gamma r| / |patch token|", "relative change")):
        values = [(r.transition, getattr(r, key)) for r in rows if getattr(r, key) is not None]
        if values:
            ax.bar(*zip(*values), color="tab:orange", label="learned" if key == "gamma" else "mean over the images")
            ax.axhline(0, color="grey", ls="--", lw=1, label="AR off (gamma = 0)" if key == "gamma" else None)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no attentive reinforcement", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("transition (block i -> i+1)")
        ax.set_ylabel(label)
    for ax in axes:
        if xs:
            ax.set_xticks(xs)
    fig.suptitle(title or f"{explanation.method}: learned per-transition quantities", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
