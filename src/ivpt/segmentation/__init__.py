"""Semantic segmentation: prompted encoders with SETR-style decoders."""
from .decoders import DECODERS
from .metrics import ConfusionMatrix
from .model import (SegmentationModel, count_segmentation_parameters, create_segmentation_model,
                    multiscale_flip_inference, slide_inference)

__all__ = ["DECODERS", "ConfusionMatrix", "SegmentationModel", "count_segmentation_parameters",
           "create_segmentation_model", "multiscale_flip_inference", "slide_inference"]
