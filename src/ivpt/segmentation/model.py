"""Semantic segmentation with a prompted encoder: the same encoder as classification, a decoder on
the patch grid (prompts dropped at the output), any input size."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import EncoderTokens, ExplainedForward, PromptedViT
from ..factory import count_parameters, create_model
from ..options import check_choice, check_int
from ..tuned import AdapterMixin
from .decoders import DECODERS, make_decoder


class SegmentationModel(AdapterMixin, nn.Module):
    task = "segmentation"

    def __init__(self, encoder: PromptedViT, decoder: str, num_classes: int, crop_size: int,
                 channels: int = 256, class_names: list[str] | None = None, ignore_index: int | None = None,
                 decoder_stages: int | None = None):
        super().__init__()
        check_choice("decoder", decoder, DECODERS)
        check_int("num_classes", num_classes, low=1)
        self.encoder = encoder
        self.decoder_kind, self.num_classes, self.crop_size, self.channels = decoder, num_classes, crop_size, channels
        # SETR-PUP's 2x stages: log2(patch) brings the grid back to full resolution; recorded in adapters
        self.decoder_stages = decoder_stages or max(1, round(math.log2(self.patch_size)))
        self.decoder = make_decoder(decoder, encoder.backbone.embed_dim, num_classes, channels, self.decoder_stages)
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        self.recorded: dict = {}  # the loaded adapter's data spec and segmentation options (see PromptedViT)

    def reset_decoder(self, num_classes: int, class_names: list[str] | None = None,
                      ignore_index: int | None = None) -> None:
        """A fresh decoder for ``num_classes`` (the data decides the classes after the encoder is built)."""
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.decoder = make_decoder(self.decoder_kind, self.encoder.backbone.embed_dim, num_classes, self.channels,
                                    self.decoder_stages)

    @property
    def patch_size(self) -> int:
        return self.encoder.backbone.patch_embed.patch_size[0]

    @property
    def method(self):
        return self.encoder.method

    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        tuned = {f"encoder.{n}": p for n, p in self.encoder.tuned_parameters().items()}
        tuned.update({f"decoder.{n}": p for n, p in self.decoder.named_parameters()})
        return tuned

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Tuned parameters plus the decoder's BatchNorm statistics."""
        tensors = {f"encoder.{n}": t for n, t in self.encoder.adapter_tensors().items()}
        tensors.update({f"decoder.{n}": t for n, t in self.decoder.state_dict(keep_vars=True).items()})
        return tensors

    def patch_grid(self, images: torch.Tensor, tokens: EncoderTokens | None = None) -> torch.Tensor:
        """(B, d, h, w) patch features of the last block after the final norm (``tokens``: already encoded)."""
        patches = (tokens if tokens is not None else self.encoder.forward_tokens(images)).patches
        ph, pw = self.encoder.backbone.patch_embed.patch_size
        h, w = images.shape[-2] // ph, images.shape[-1] // pw
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.patch_grid(images), images.shape[-2:])

    def forward_explained(self, images: torch.Tensor) -> ExplainedForward:
        """``self(images)`` (per-pixel logits) with the encoder's trace (``PromptedViT.forward_traced``)."""
        tokens, trace = self.encoder.forward_traced(images)
        return ExplainedForward(self.decoder(self.patch_grid(images, tokens), images.shape[-2:]), trace)

    def adapter_config(self) -> dict:
        config = self.encoder.adapter_config()
        config.update(task="segmentation", pooling_modules=self.encoder.origin.pooling_modules,
                      num_classes=self.num_classes, class_names=self.class_names,
                      decoder=self.decoder_kind, decoder_channels=self.channels, decoder_stages=self.decoder_stages,
                      crop_size=self.crop_size, ignore_index=self.ignore_index)
        return config


def create_segmentation_model(backbone, method: str, num_classes: int, *, decoder: str = "pup",
                              crop_size: int = 512, decoder_channels: int = 256, weights=None,
                              pretrained: bool = False, class_names=None, ignore_index: int | None = None,
                              timm_kwargs: dict | None = None, decoder_stages: int | None = None,
                              pooling_modules: bool = False, **options) -> SegmentationModel:
    """A prompted encoder (any method) at ``crop_size`` plus a decoder; position embeddings are resized
    for the crop by timm and follow any other input size (``dynamic_img_size``).

    pooling_modules: keep timm's pooling modules in the encoder (adapters saved before they were removed
    hold tensors there); new models leave them out, since the patch tokens never pass them.
    """
    check_choice("decoder", decoder, DECODERS)
    kwargs = {"img_size": crop_size, "dynamic_img_size": True, **(timm_kwargs or {})}
    if not isinstance(backbone, str):
        kwargs = None
    encoder = create_model(backbone, method, 1, weights=weights, pretrained=pretrained, timm_kwargs=kwargs,
                           pooling=pooling_modules, **options)
    encoder.reset_classifier(0)  # no classification head: the decoder replaces it
    return SegmentationModel(encoder, decoder, num_classes, crop_size, decoder_channels, class_names, ignore_index,
                             decoder_stages)


def count_segmentation_parameters(model: SegmentationModel) -> dict[str, int]:
    counts = count_parameters(model.encoder)
    counts["decoder"] = sum(p.numel() for p in model.decoder.parameters())
    counts["prompt_side"] = counts["tuned_without_head"]
    counts["tuned"] = counts["tuned"] + counts["decoder"]
    counts["total"] = counts["total"] + counts["decoder"]
    return counts


@torch.no_grad()
def slide_inference(model: SegmentationModel, images: torch.Tensor, crop: int | None = None,
                    stride: int | None = None, windows_per_batch: int = 64) -> torch.Tensor:
    """Logits for images larger than the crop: overlapping crop x crop windows, averaged.

    ``crop`` defaults to the model's crop size and ``stride`` to 2/3 of the crop (the windows overlap).

    Windows go through the model together, up to ``windows_per_batch`` at a time: one call per window
    would cost more in per-call overhead than in arithmetic at small crops. In eval mode every layer
    treats samples independently, so batching does not change the result.
    """
    crop = crop or model.crop_size
    stride = stride or crop * 2 // 3
    b, _, height, width = images.shape
    if height <= crop and width <= crop:
        return model(images)
    rows = max(1, math.ceil((height - crop) / stride) + 1)
    cols = max(1, math.ceil((width - crop) / stride) + 1)
    boxes = [(min(r * stride, max(height - crop, 0)), min(c * stride, max(width - crop, 0)))
             for r in range(rows) for c in range(cols)]
    logits = images.new_zeros(b, model.num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    per_call = max(1, windows_per_batch // b)
    for start in range(0, len(boxes), per_call):
        chunk = boxes[start:start + per_call]
        windows = torch.cat([images[:, :, top:top + crop, left:left + crop] for top, left in chunk])
        outputs = model(windows).split(b)
        for (top, left), out in zip(chunk, outputs):
            h, w = out.shape[-2:]
            logits[:, :, top:top + h, left:left + w] += out
            counts[:, :, top:top + h, left:left + w] += 1
    return logits / counts


MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the mmseg / SETR multi-scale evaluation


@torch.no_grad()
def multiscale_flip_inference(model: SegmentationModel, images: torch.Tensor, scales=MS_SCALES,
                              crop: int | None = None, stride: int | None = None) -> torch.Tensor:
    """mIoU-MS: average softmax over rescaled and flipped copies, back at the input size."""
    size = images.shape[-2:]
    ph = model.patch_size
    total = 0
    for scale in scales:
        h = max(ph, round(size[0] * scale / ph) * ph)
        w = max(ph, round(size[1] * scale / ph) * ph)
        scaled = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        for flip in (False, True):
            x = scaled.flip(-1) if flip else scaled
            out = slide_inference(model, x, crop, stride)
            out = out.flip(-1) if flip else out
            # fp32: the probabilities of many copies are summed (autocast would keep them in bf16)
            total = total + F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
    return total / (2 * len(scales))
