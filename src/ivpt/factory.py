"""``create_model``: a timm ViT name or model in, a prompt-tuned classifier out."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .backbone import BackboneOrigin, backbone_name, backbone_shape, build_backbone
from .backbones import is_shipped
from .data.paths import absolute_path
from .encoder import PromptedViT
from .methods import METHODS
from .options import OptionError, check_int, config_from_options


def method_class(method: str):
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; expected one of {', '.join(map(repr, METHODS))}")
    return METHODS[method]


def create_model(backbone: str | nn.Module, method: str, num_classes: int, *, pretrained: bool = False,
                 weights: str | Path | None = None, class_names: list[str] | None = None,
                 timm_kwargs: dict[str, Any] | None = None, pooling: bool = True, **options) -> PromptedViT:
    """Build a timm Vision Transformer tuned by ``method`` for ``num_classes`` classes.

    backbone: a timm model name (optionally ``name.tag``) or an already built timm VisionTransformer.
    method: 'linear', 'full', 'vpt-shallow', 'vpt-deep' or 'ivpt'.
    pretrained: timm's own download mechanism (needs the hub); weights: a local file instead
        (.safetensors, .pth/.bin state dict, or Google's .npz).
    timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``dynamic_img_size``).
    options: the method's options (``prompt_length``, ``prompt_dropout``, and iVPT's switches).
    pooling: False for a dense encoder (segmentation): timm's pooling modules (``attn_pool``, ``fc_norm``)
        are removed before the method attaches, so that nothing is tuned that the patch tokens never pass.
    """
    cls = method_class(method)
    config = config_from_options(cls.config_class, method, options)  # before any heavy work
    check_int("num_classes", num_classes, low=1)
    if not pooling and getattr(config, "pool_prompts", False):
        raise OptionError("option 'pool_prompts': a dense (segmentation) encoder has no pooling for the prompts to "
                          "join; leave pool_prompts off")
    if class_names is not None and len(class_names) != num_classes:
        raise OptionError(f"option 'class_names': {len(class_names)} names given for num_classes={num_classes}")
    vit = build_backbone(backbone, num_classes, pretrained=pretrained, weights=weights, **(timm_kwargs or {}))
    if not pooling:
        # unused tensors would count as tuned, be stored in adapters, and stop DDP at its second step
        vit.attn_pool, vit.fc_norm = None, nn.Identity()
    tuner = cls(config, backbone_shape(vit))
    # where the backbone weights came from, so an adapter can be reloaded onto the same ones
    origin = BackboneOrigin(*weights_origin(backbone, weights, pretrained), timm_kwargs=dict(timm_kwargs or {}),
                            pooling_modules=pooling)
    return PromptedViT(vit, tuner, backbone_name=backbone if isinstance(backbone, str) else backbone_name(vit),
                       class_names=class_names, origin=origin)


def weights_origin(backbone: str | nn.Module, weights, pretrained: bool) -> tuple[str, str | None]:
    """(weights_source, weights_file) of a backbone built by ``build_backbone`` from these arguments."""
    if weights is not None:
        return "file", absolute_path(weights)
    if not isinstance(backbone, str):
        return "module", None
    return ("pretrained" if pretrained or is_shipped(backbone) else "none"), None


def count_parameters(model: PromptedViT) -> dict[str, int]:
    """Parameter counts: total, tuned, frozen backbone, head, and each component the method names in
    ``parameter_groups`` (iVPT: prompts, da, ar; LoRA: lora; ...)."""
    def size(params) -> int:
        return sum(p.numel() for p in params)

    head = size(model.head.parameters())
    counts = {
        "total": size(model.parameters()),
        "tuned": size(model.tuned_parameters().values()),
        "backbone": size(model.backbone.parameters()) - head,
        "head": head,
        **{name: size(params) for name, params in model.method.parameter_groups().items()},
    }
    counts["tuned_without_head"] = counts["tuned"] - head
    return counts
