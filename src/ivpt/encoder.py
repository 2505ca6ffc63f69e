"""The prompted encoder: timm's own ViT blocks, run one by one with prompt tokens between them.

Token order inside the encoder: [prefix (CLS, registers) | p prompts | m patches]. Prompts are
inserted after timm's position embedding, patch dropout and pre-norm, so they carry no position.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._version import __version__
from .backbone import (OWNER_ATTRIBUTE, BackboneOrigin, backbone_shape, backbone_signature, check_unowned, frozen_weights_digest,
                       weights_fingerprint)
from .methods.base import TuningMethod
from .tuned import AdapterMixin


@dataclass
class EncoderTokens:
    """Normalised output tokens of the last block, split by role."""

    prefix: torch.Tensor   # (B, num_prefix_tokens, d)
    prompts: torch.Tensor  # (B, p, d)
    patches: torch.Tensor  # (B, m, d)

    def without_prompts(self) -> torch.Tensor:
        """timm's token layout (prefix + patches), so timm's pooling and heads apply unchanged."""
        return torch.cat([self.prefix, self.patches], dim=1)


@dataclass
class Reinforcement:
    """What AR did after one block in the last forward (detached, for inspection and plots)."""

    transition: int            # block i -> i+1
    saliency: torch.Tensor     # (B, m) attention of the saliency queries to each patch
    selected: torch.Tensor     # (B, K) indices of the reinforced patches
    # (B,) mean over the selected patches of |gamma r| / |E_j|; only while recording (``record_attention``)
    ratio: torch.Tensor | None = None


def query_saliency(q: torch.Tensor, k: torch.Tensor, scale: float, query_rows: slice, key_start: int) -> torch.Tensor:
    """mean over heads (and query rows) of softmax(q k^T * scale), restricted to keys from key_start.

    q, k: (B, H, T, d_h), after timm's q_norm / k_norm: the very tensors the block's attention uses.
    Costs O(H * T * d_h) per query row: only the needed rows of q are used, never the T x T matrix.
    """
    probs = ((q[:, :, query_rows].float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, rows, T)
    return probs.mean(dim=(1, 2))[:, key_start:]


def run_block(block: nn.Module, x: torch.Tensor, query_rows: slice | None = None, key_start: int = 0,
              defer: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``block(x)`` for a timm ``Block`` with timm ``Attention``, run module by module.

    query_rows: also return the saliency from the same q and k the attention uses (AR), no hook, no
    second projection, so eager and ``torch.compile`` graphs agree. defer: rows whose MLP half is left
    out; the output then lacks them, and their residual-stream state after the attention half is
    returned (a view of a tensor the block keeps for backward anyway), for DA to finish them inside
    its own recomputed function. A test pins this to ``block(x)`` for every block option.
    """
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    saliency = None
    if query_rows is not None:
        # fp32 even under autocast: bf16 would tie many of the ~0.005 weights and make AR's top-K arbitrary
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            saliency = query_saliency(q.detach(), k.detach(), attn.scale, query_rows, key_start)
    if attn.fused_attn:
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    a = attn.norm(a.transpose(1, 2).reshape(b, t, attn.attn_dim))
    if gate is not None:
        a = a * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(a))))
    if defer is None:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), saliency, None
    normed = block.norm2(x)  # over every row: LayerNorm keeps x for backward, deferred rows included
    keep = lambda y: torch.cat([y[:, :defer.start], y[:, defer.stop:]], dim=1)  # noqa: E731
    return keep(x) + block.drop_path2(block.ls2(block.mlp(keep(normed)))), saliency, x[:, defer]


def finish_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of ``block`` for rows whose attention half ``run_block(..., defer=)`` returned."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_with_saliency(block: nn.Module, x: torch.Tensor, query_rows: slice,
                        key_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``block(x)`` and the saliency from the same q and k (see ``run_block``)."""
    out, saliency, _ = run_block(block, x, query_rows, key_start)
    return out, saliency


@torch.no_grad()
def _relative_change(before: torch.Tensor, after: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(B,) mean over the selected patches of |after - before| / |before|."""
    index = selected.unsqueeze(-1).expand(-1, -1, before.shape[-1])
    old, new = before.gather(1, index).float(), after.gather(1, index).float()
    return ((new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)).mean(dim=1)


class PromptedViT(AdapterMixin, nn.Module):
    """A timm VisionTransformer plus one tuning method; ``forward(images)`` gives logits.

    origin: how the backbone was built (weights, timm arguments), recorded in adapters; ``create_model``
    gives it, a model built by hand around a timm module records ``weights_source: module``."""

    def __init__(self, backbone: VisionTransformer, method: TuningMethod, *, backbone_name: str | None = None,
                 class_names: list[str] | None = None, origin: BackboneOrigin | None = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.origin = origin or BackboneOrigin()
        self.backbone_name = backbone_name
        self.class_names = list(class_names) if class_names is not None else None
        # what the adapter this model was loaded from records about its data (the data spec), which decides
        # how new images are read; set by load_adapter, used by export_onnx
        self.recorded: dict = {}
        self.ar_source = getattr(method.config, "ar_source", "cls")
        self.last_reinforcement: list[Reinforcement] = []
        # record_attention: every block's saliency (even where AR does not act, e.g. VPT-deep) goes to
        # last_attention, and AR's relative change to last_reinforcement; for ivpt.explain and diagnostics
        self.record_attention = False
        self.last_attention: dict[int, torch.Tensor] = {}
        self.shape = backbone_shape(backbone)
        check_unowned(backbone)
        method.attach(backbone)  # module methods (LoRA, adapters, SSF, BitFit) hook into timm's modules here
        backbone.__dict__[OWNER_ATTRIBUTE] = method.name
        self._set_trainable()

    # -- what trains -----------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> tensor of everything the method trains (head always; backbone only for 'full')."""
        if self.method.tunes_backbone:
            return dict(self.named_parameters())
        chosen = {id(p) for p in self.head.parameters()} | {id(p) for p in self.method.parameters()}
        chosen |= {id(p) for p in self.method.backbone_parameters(self.backbone)}  # BitFit: biases in place
        return {n: p for n, p in self.named_parameters() if id(p) in chosen}

    def reset_classifier(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """A fresh head for ``num_classes`` (trainable, like every head); 0 removes the head."""
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.backbone.reset_classifier(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self._set_trainable()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter stores: the tuned parameters (and, for 'full', the backbone's buffers)."""
        tensors = dict(self.tuned_parameters())
        if self.method.tunes_backbone:
            tensors.update(self.named_buffers())
        return tensors

    def release_backbone(self) -> None:
        """Take the method's hooks out of the backbone and free it for another model (this one is then unusable)."""
        from .methods.modules import strip_hooks

        strip_hooks(self.backbone, self.method.hook_ids)
        self.backbone.__dict__.pop(OWNER_ATTRIBUTE, None)

    def frozen_weights_sha256(self) -> str | None:
        """The digest of the backbone's frozen tensors, recorded in adapters (see backbone.frozen_weights_digest)."""
        return frozen_weights_digest(self.backbone, {id(p) for p in self.tuned_parameters().values()})

    def _set_trainable(self) -> None:
        tuned = {id(p) for p in self.tuned_parameters().values()}
        for p in self.parameters():
            p.requires_grad_(id(p) in tuned)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.method.tunes_backbone:
            self.backbone.eval()  # frozen backbone: no dropout, no drop-path, ever
        return self

    # -- forward -----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """timm's own embedding path: patches, position embedding, patch dropout, pre-norm."""
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def forward_tokens(self, images: torch.Tensor) -> EncoderTokens:
        vit, method = self.backbone, self.method
        x = self.embed(images)
        npt = vit.num_prefix_tokens
        prefix, patches = x[:, :npt], x[:, npt:]
        prompts = method.first_prompts(x.shape[0])
        prompts = x[:, :0] if prompts is None else prompts.to(x.dtype)  # no prompts: an empty slice
        records, attention = [], {}
        last = len(vit.blocks) - 1
        record = self.record_attention
        for i, block in enumerate(vit.blocks):
            p = prompts.shape[1]
            reinforce = i < last and method.needs_saliency(i)
            # DA at this transition: the prompt rows' MLP half runs inside DA's recomputed function, so
            # backward keeps no copy of Z_i (docs/method.md); not while recording (explain reads Z_i's mix)
            defer = (i < last and not record and not vit.grad_checkpointing and torch.is_grad_enabled()
                     and method.aggregates_block_output(i))
            if defer:
                rows = self._saliency_rows(npt, p) if reinforce else None
                tokens = torch.cat([prefix, prompts, patches], dim=1)
                rest, saliency, residual = run_block(block, tokens, rows, npt + p, defer=slice(npt, npt + p))
                prefix, patches = rest[:, :npt], rest[:, npt:]
                prompts = method.next_prompts_from_residual(i, residual, block, prompts).to(rest.dtype)
                if reinforce:
                    patches, selected = method.reinforce(i, patches, saliency, prompts)
                    records.append(Reinforcement(i, saliency.detach(), selected.detach()))
                continue
            # timm's set_grad_checkpointing(): the whole transition (block, saliency, the next prompts, AR)
            # recomputed in backward, which keeps only its inputs, as for any other method's block
            checkpointed = vit.grad_checkpointing and torch.is_grad_enabled() and not record
            step = functools.partial(self._transition, i, block, reinforce=reinforce, saliency=reinforce or record,
                                     last=i == last)
            if checkpointed:
                prefix, prompts, patches, saliency, selected, before = checkpoint(step, prefix, prompts, patches,
                                                                                 use_reentrant=False)
                if i < last and (reinforce or method.aggregates_block_output(i)):
                    # DA's prompts and AR's patches are new tensors: the slices still pointing into the block's
                    # output would keep all of it alive (its stale prompt rows too) for the next checkpoint
                    prefix, patches = prefix.clone(), patches if reinforce else patches.clone()
            else:
                prefix, prompts, patches, saliency, selected, before = step(prefix, prompts, patches)
            if record:
                attention[i] = saliency.detach()
            if reinforce:
                ratio = _relative_change(before, patches, selected) if record else None
                records.append(Reinforcement(i, saliency.detach(), selected.detach(), ratio))
        self.last_reinforcement = records
        self.last_attention = attention
        tokens = vit.norm(torch.cat([prefix, prompts, patches], dim=1))
        p = prompts.shape[1]
        return EncoderTokens(tokens[:, :npt], tokens[:, npt:npt + p], tokens[:, npt + p:])

    def _transition(self, i: int, block: nn.Module, prefix: torch.Tensor, prompts: torch.Tensor, patches: torch.Tensor,
                    *, reinforce: bool, saliency: bool, last: bool):
        """Block i on [prefix, prompts, patches], then (but after the last block) the prompts for block i + 1
        and AR on the patches: (prefix, prompts, patches, saliency or None, AR's selection or None, the
        patches before AR)."""
        npt, p = prefix.shape[1], prompts.shape[1]
        tokens = torch.cat([prefix, prompts, patches], dim=1)
        if saliency:
            out, attention = block_with_saliency(block, tokens, self._saliency_rows(npt, p), npt + p)
        else:
            out, attention = block(tokens), None
        prefix, z, patches = out[:, :npt], out[:, npt:npt + p], out[:, npt + p:]
        if last:
            return prefix, z, patches, attention, None, patches
        following = self.method.next_prompts(i, z, prompts)  # prompts: Q_i, what entered block i
        prompts = z if following is None else following.to(z.dtype)
        before, selected = patches, None
        if reinforce:
            patches, selected = self.method.reinforce(i, patches, attention, prompts)
        return prefix, prompts, patches, attention, selected, before

    def _saliency_rows(self, num_prefix: int, num_prompts: int) -> slice:
        """The query rows whose attention is the saliency: CLS, or the prompts (``ar_source``)."""
        if self.ar_source == "cls" and self.shape.has_class_token:
            return slice(0, 1)
        if num_prompts == 0:
            raise ValueError("saliency needs a class token or prompt tokens as queries; this model has neither")
        return slice(num_prefix, num_prefix + num_prompts)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised tokens in timm's layout (prefix + patches; prompts dropped)."""
        return self.forward_tokens(images).without_prompts()

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's pooling (CLS, or mean of the patch tokens only), fc_norm and head."""
        return self.backbone.forward_head(features, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    # -- merging -----------------------------------------------------------------------------
    def merge(self) -> VisionTransformer:
        """A plain timm model (a copy; this one is unchanged) with the method folded into its weights.

        For methods whose change is linear in the weights (LoRA, SSF, BitFit; linear and full trivially);
        prompt methods and bottleneck adapters raise ValueError. ``merged.state_dict()`` has timm's own
        names, head included, so ``timm.create_model(name, pretrained=True, num_classes=K,
        pretrained_cfg_overlay=dict(file=PATH, num_classes=K))`` loads it with no ivpt code.
        """
        import copy

        from .methods.modules import strip_hooks

        state = self.method.merged_state(self.backbone)
        merged = copy.deepcopy(self.backbone)
        strip_hooks(merged, self.method.hook_ids)
        del merged.__dict__[OWNER_ATTRIBUTE]  # a plain timm model, free to build a new ivpt model on
        merged.load_state_dict(state)
        merged.requires_grad_(False)
        return merged.eval()

    # -- saving ------------------------------------------------------------------------------
    task = "classification"

    def adapter_config(self) -> dict:
        """What an adapter records beside the tensors: method, options, backbone, classes, input."""
        vit = self.backbone
        pcfg = getattr(vit, "pretrained_cfg", None) or {}
        options = dataclasses.asdict(self.method.config)
        return {
            "ivpt_version": __version__,
            "task": "classification",
            "method": self.method_name,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "num_classes": vit.num_classes,
            "class_names": self.class_names,
            "backbone": {
                "name": self.backbone_name,
                "timm_kwargs": self.origin.timm_kwargs,
                "weights_source": self.origin.weights_source,
                "weights_file": self.origin.weights_file,
                "signature": backbone_signature(vit),
                "weights_fingerprint": None if self.method.tunes_backbone else weights_fingerprint(vit),
                "frozen_weights_sha256": None if self.method.tunes_backbone else self.frozen_weights_sha256(),
            },
            "image_size": list(vit.patch_embed.img_size) if vit.patch_embed.img_size else None,
            "dynamic_img_size": bool(getattr(vit, "dynamic_img_size", False)),
            "mean": list(pcfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(pcfg.get("std", (0.229, 0.224, 0.225))),
            "interpolation": pcfg.get("interpolation", "bicubic"),
        }
