"""Datasets, layouts and transforms: folders, VTAB-1k, FGVC, CIFAR-10, CamVid and the offline suite."""
from .datasets import ArrayDataset, DataError, ImageListDataset
from .fgvc import FGVC_DATASETS, fgvc
from .folder import image_folder, image_folder_splits
from .suite import SUITE_TASKS, load_task, summarize
from .transforms import backbone_transform, fgvc_transform, vtab_transform
from .vtab import VTAB_TASKS, vtab_1k

__all__ = [
    "ArrayDataset", "DataError", "ImageListDataset", "FGVC_DATASETS", "fgvc", "image_folder",
    "image_folder_splits", "SUITE_TASKS", "load_task", "summarize", "backbone_transform", "fgvc_transform",
    "vtab_transform", "VTAB_TASKS", "vtab_1k",
]
