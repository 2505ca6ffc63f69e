"""The prompted encoder: timm's own ViT blocks, run one by one with prompt tokens between them.

Token order inside the encoder: [prefix (CLS, registers) | p prompts | m patches]. Prompts are
inserted after timm's position embedding, patch dropout and pre-norm, so they carry no position.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._version import __version__
from .backbone import (OWNER_ATTRIBUTE, BackboneOrigin, backbone_shape, backbone_signature, check_unowned, frozen_weights_digest,
                       weights_fingerprint)
from .methods.base import TuningMethod
from .options import OptionError
from .tuned import AdapterMixin


# DA defers its prompt rows' MLP half (recomputed in backward, saving Z_i's copy) where the prompts are at least
# this share of a block's tokens: the memory saved and the time paid both grow with it, and below it the time
# weighs more (measured: docs/benchmarks.md, "iVPT (the gate) against VPT-deep" and "Lean DA")
DEFER_SHARE = 0.2


@dataclass
class EncoderTokens:
    """Normalised output tokens of the last block, split by role."""

    prefix: torch.Tensor   # (B, num_prefix_tokens, d)
    prompts: torch.Tensor  # (B, p, d)
    patches: torch.Tensor  # (B, m, d)

    def without_prompts(self) -> torch.Tensor:
        """timm's token layout (prefix + patches), so timm's pooling and heads apply unchanged."""
        return torch.cat([self.prefix, self.patches], dim=1)

    def with_prompts(self) -> torch.Tensor:
        """Every token, prompts after the prefix: timm's average pooling then averages prompts and patches."""
        return torch.cat([self.prefix, self.prompts, self.patches], dim=1)


def check_prompt_pooling(vit: VisionTransformer) -> None:
    """``pool_prompts`` means timm's average pooling over prompts and patches; refuse every other pooling."""
    pooling = "map (attention pooling)" if vit.attn_pool is not None else repr(vit.global_pool)
    if vit.attn_pool is None and vit.global_pool == "avg":
        if getattr(vit, "pool_include_prefix", False):  # VPT's code leaves the class token out of the average
            raise OptionError("option 'pool_prompts': this backbone's average includes its prefix tokens "
                              "(pool_include_prefix); VPT's code averages prompts and patches only. Build it "
                              "without pool_include_prefix, or leave pool_prompts off")
        return
    raise OptionError(
        f"option 'pool_prompts': this backbone pools by {pooling}, not by the average over its tokens, so there is "
        "no average for the prompts to join. Build it with backbone_options {global_pool: avg} (timm then applies "
        "its fc_norm after the pooling, as VPT's MAE code does), or leave pool_prompts off")


@dataclass
class EncoderTrace:
    """What one forward pass computed on the way, for ``ivpt explain`` and the training diagnostics.

    Only ``forward_traced`` / ``forward_explained`` return one; a plain forward keeps none of it. All
    tensors are detached. Transition i sits between block i and block i + 1.
    """

    # block i -> (B, m) float32: the saliency AR ranks (CLS or prompt queries' attention to each patch,
    # averaged over heads), for every block, also where AR does not act and for methods without AR
    saliency: dict[int, torch.Tensor] = field(default_factory=dict)
    # transition i -> (B, K): the patches AR reinforced after block i
    selected: dict[int, torch.Tensor] = field(default_factory=dict)
    # transition i -> (B,): mean over the reinforced patches of |gamma r| / |E_j| (AR's relative change)
    reinforcement_ratio: dict[int, torch.Tensor] = field(default_factory=dict)
    # transition i -> DA's mixing weight alpha as this pass computed it: gate (B, p, 1), channel (B, p, d),
    # static () (sigmoid(theta), the same for every input); none for da="sum" or where DA does not act
    da_weights: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ExplainedForward:
    """``model.forward_explained(images)``: the model's output and what its encoder computed on the way."""

    output: torch.Tensor  # logits (classification) or per-pixel logits (segmentation), as ``model(images)``
    trace: EncoderTrace


def query_saliency(q: torch.Tensor, k: torch.Tensor, scale: float, query_rows: slice, key_start: int) -> torch.Tensor:
    """mean over heads (and query rows) of softmax(q k^T * scale), restricted to keys from key_start.

    q, k: (B, H, T, d_h), after timm's q_norm / k_norm: the very tensors the block's attention uses.
    Costs O(H * T * d_h) per query row: only the needed rows of q are used, never the T x T matrix.
    """
    probs = ((q[:, :, query_rows].float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, rows, T)
    return probs.mean(dim=(1, 2))[:, key_start:]


def run_block(block: nn.Module, x: torch.Tensor, query_rows: slice | None = None, key_start: int = 0,
              defer: slice | None = None, key_values: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``block(x)`` for a timm ``Block`` with timm ``Attention``, run module by module.

    query_rows: also return the saliency from the same q and k the attention uses (AR), no hook, no
    second projection, so eager and ``torch.compile`` graphs agree. defer: rows whose MLP half is left
    out; the output then lacks them, and their residual-stream state after the attention half is
    returned (a copy of those rows only), for DA to finish them inside its own recomputed function.
    key_values: (keys, values), each (B, H, n, d_h), attended to before the tokens' own (E2VPT's key-value
    prompts): they join the keys after timm's k_norm, as projected keys do, and the saliency's softmax.
    A test pins this to ``block(x)`` for every block option.
    """
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if key_values is not None:
        k, v = torch.cat([key_values[0].to(k.dtype), k], dim=2), torch.cat([key_values[1].to(v.dtype), v], dim=2)
        key_start += key_values[0].shape[2]
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
    # The kept rows need one contiguous copy: rows of a batch-major (B, T, d) tensor are strided across the
    # batch whatever the token order, and LayerNorm and Linear would copy a strided view themselves. One
    # split, so backward joins x's gradient in a single cat; LayerNorm is per row, so norm2 over the kept rows
    # equals norm2 over all rows, then kept (tested). The deferred rows are copied too (p rows), so that
    # nothing keeps x itself alive: norm2 keeps ``kept``, DA's function keeps the deferred rows.
    before, deferred, after = x.split([defer.start, defer.stop - defer.start, t - defer.stop], dim=1)
    kept = torch.cat([before, after], dim=1)
    out = kept + block.drop_path2(block.ls2(block.mlp(block.norm2(kept))))
    return out, saliency, deferred.clone(memory_format=torch.contiguous_format)


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
        self.shape = backbone_shape(backbone)
        # VPT's VIT_POOL_TYPE "original": the prompt outputs join the average pooling (docs/method.md)
        self.pool_prompts = bool(getattr(method.config, "pool_prompts", False))
        if self.pool_prompts:
            check_prompt_pooling(backbone)
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
        """The normalised tokens of the last block, split by role (prefix, prompts, patches)."""
        return self._encode(images, None)

    def forward_traced(self, images: torch.Tensor) -> tuple[EncoderTokens, EncoderTrace]:
        """``forward_tokens`` and what the pass computed on the way (every block's saliency, AR's selection
        and relative change, DA's weights), as timm's ``forward_intermediates`` returns intermediates.
        Outputs equal ``forward_tokens``'s (tested); it runs every block whole and unchecked."""
        trace = EncoderTrace()
        return self._encode(images, trace), trace

    def forward_explained(self, images: torch.Tensor) -> ExplainedForward:
        """``self(images)`` (the logits) together with the encoder's trace (see ``forward_traced``)."""
        tokens, trace = self.forward_traced(images)
        return ExplainedForward(self.forward_head(tokens.without_prompts()), trace)

    def _encode(self, images: torch.Tensor, trace: EncoderTrace | None) -> EncoderTokens:
        vit = self.backbone
        x = self.embed(images)
        npt = vit.num_prefix_tokens
        prompts = self.method.first_prompts(x.shape[0])
        prompts = x[:, :0] if prompts is None else prompts.to(x.dtype)  # no prompts: an empty slice
        tokens = (x[:, :npt], prompts, x[:, npt:])  # (prefix, prompts, patches), never joined between blocks
        for i, block in enumerate(vit.blocks):
            # each transition runs in one of three ways, each a separate decision (see the predicates below)
            if self._defers_prompt_rows(i, trace, tokens[1].shape[1], sum(t.shape[1] for t in tokens)):
                tokens = self._deferred_transition(i, block, *tokens)
            elif self._checkpoints(trace):
                tokens = checkpoint(self._transition, i, block, *tokens, use_reentrant=False)
                tokens = self._free_block_output(i, *tokens)
            else:
                tokens = self._transition(i, block, *tokens, trace=trace)
        prefix, prompts, patches = tokens
        out = vit.norm(torch.cat(tokens, dim=1))
        return EncoderTokens(*out.split([npt, prompts.shape[1], patches.shape[1]], dim=1))

    # -- how a transition runs: one named decision each ----------------------------------------------
    def _is_last(self, i: int) -> bool:
        return i == len(self.backbone.blocks) - 1

    def _reinforces(self, i: int) -> bool:
        """AR acts after block i (the block then also gives its saliency)."""
        return not self._is_last(i) and self.method.needs_saliency(i)

    def _checkpoints(self, trace: EncoderTrace | None) -> bool:
        """timm's ``set_grad_checkpointing()``: each whole transition (block, saliency, the next prompts, AR)
        is recomputed in backward, which keeps only its inputs, as for any other method's block. Not for a
        traced pass, whose records are made inside the transition."""
        return self.backbone.grad_checkpointing and torch.is_grad_enabled() and trace is None

    def _defers_prompt_rows(self, i: int, trace: EncoderTrace | None, prompts: int, tokens: int) -> bool:
        """DA at transition i, while training without checkpointing, where prompts are at least DEFER_SHARE of
        the block's tokens: the prompt rows' MLP half runs inside DA's own recomputed function, so backward
        keeps no copy of Z_i (docs/method.md). Below that share the copy is small and the whole block is
        faster (ViT-B/16, p = 10: 5% of a step, 1.2% more bytes). Not in inference (nothing is kept there)
        and not for a traced pass (it reads Z_i)."""
        return (not self._is_last(i) and trace is None and torch.is_grad_enabled()
                and not self.backbone.grad_checkpointing and prompts >= DEFER_SHARE * tokens
                and self.method.aggregates_block_output(i))

    # -- the transitions ------------------------------------------------------------------------------
    def _transition(self, i: int, block: nn.Module, prefix: torch.Tensor, prompts: torch.Tensor,
                    patches: torch.Tensor, trace: EncoderTrace | None = None):
        """Block i on [prefix, prompts, patches], then (but after the last block) the prompts for block i + 1
        (from Z_i and Q_i, the prompts that entered block i) and AR on the patches; records into ``trace``."""
        npt, p = prefix.shape[1], prompts.shape[1]
        reinforce = self._reinforces(i)
        tokens = torch.cat([prefix, prompts, patches], dim=1)
        key_values = self.method.key_value_prompts(i, tokens.shape[0])
        if reinforce or trace is not None or key_values is not None:  # module by module: saliency, key-value prompts
            rows = self._saliency_rows(npt, p) if reinforce or trace is not None else None
            out, saliency, _ = run_block(block, tokens, rows, npt + p, key_values=key_values)
        else:
            out, saliency = block(tokens), None
        # one split, not three slices: backward joins the three gradients in one cat
        prefix, z, patches = out.split([npt, p, patches.shape[1]], dim=1)
        if trace is not None:
            trace.saliency[i] = saliency.detach()
        if self._is_last(i):
            return prefix, z, patches
        if trace is None:
            following = self.method.next_prompts(i, z, prompts)
        else:
            following, weights = self.method.next_prompts_explained(i, z, prompts)
            if weights is not None:
                trace.da_weights[i] = weights.detach()
        prompts = z if following is None else following.to(z.dtype)
        if reinforce:
            before = patches
            patches, selected = self.method.reinforce(i, patches, saliency, prompts)
            if trace is not None:
                trace.selected[i] = selected.detach()
                trace.reinforcement_ratio[i] = _relative_change(before, patches, selected)
        return prefix, prompts, patches

    def _deferred_transition(self, i: int, block: nn.Module, prefix: torch.Tensor, prompts: torch.Tensor,
                             patches: torch.Tensor):
        """``_transition`` for DA while training: block i's MLP half skips the prompt rows, and DA finishes
        them inside its own function, recomputed in backward (``next_prompts_from_residual``)."""
        npt, p = prefix.shape[1], prompts.shape[1]
        reinforce = self._reinforces(i)
        rows = self._saliency_rows(npt, p) if reinforce else None
        tokens = torch.cat([prefix, prompts, patches], dim=1)
        kept, saliency, residual = run_block(block, tokens, rows, npt + p, defer=slice(npt, npt + p),
                                             key_values=self.method.key_value_prompts(i, tokens.shape[0]))
        prefix, patches = kept.split([npt, patches.shape[1]], dim=1)
        prompts = self.method.next_prompts_from_residual(i, residual, block, prompts).to(kept.dtype)
        if reinforce:
            patches, _ = self.method.reinforce(i, patches, saliency, prompts)
        return prefix, prompts, patches

    def _free_block_output(self, i: int, prefix: torch.Tensor, prompts: torch.Tensor, patches: torch.Tensor):
        """After a checkpointed transition where DA or AR made new prompts or patches: the slices still
        pointing into the block's output would keep all of it alive (its stale prompt rows too) as the next
        checkpoint's input, so they are copied out of it (VPT-deep's next input is that output itself)."""
        if self._is_last(i) or not (self._reinforces(i) or self.method.aggregates_block_output(i)):
            return prefix, prompts, patches
        return prefix.clone(), prompts, patches if self._reinforces(i) else patches.clone()

    def _saliency_rows(self, num_prefix: int, num_prompts: int) -> slice:
        """The query rows whose attention is the saliency: CLS, or the prompts (``ar_source``)."""
        if self.ar_source == "cls" and self.shape.has_class_token:
            return slice(0, 1)
        if num_prompts == 0:
            raise ValueError("saliency needs a class token or prompt tokens as queries; this model has neither")
        return slice(num_prefix, num_prefix + num_prompts)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised tokens in timm's layout (prefix + patches; prompts dropped), or with ``pool_prompts``
        every token, prompts after the prefix, for timm's average pooling to include them."""
        tokens = self.forward_tokens(images)
        return tokens.with_prompts() if self.pool_prompts else tokens.without_prompts()

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's pooling (CLS, or the mean of the tokens after the prefix: the patches, and with
        ``pool_prompts`` the prompts too), fc_norm and head."""
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
