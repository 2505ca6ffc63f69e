"""Semantic segmentation: prompted encoders with SETR-style decoders."""
from .decoders import DECODERS
from .metrics import ConfusionMatrix
from .model import (MS_SCALES, SegmentationModel, count_segmentation_parameters, create_segmentation_model,
                    multiscale_flip_inference, slide_inference)

__all__ = ["DECODERS", "MS_SCALES", "ConfusionMatrix", "SegmentationModel", "count_segmentation_parameters",
           "create_segmentation_model", "multiscale_flip_inference", "slide_inference"]
