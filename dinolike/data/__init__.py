"""Data pipeline: datasets, DINOv2 multi-crop augmentation, iBOT masks, position-indexed SSL loading."""

from .augment import MultiCropAugmentation, blur_kernel_size
from .collate import build_ssl_loader, collate_ssl
from .datasets import DataError, FashionMNIST, ImageFolder, Manifest, build_dataset, load_image
from .masking import MaskGenerator, MaskSampler, sample_mask
from .positions import PositionBatchSampler, PositionSampler, SSLDataset, derive_seed

__all__ = [
    "DataError",
    "FashionMNIST",
    "ImageFolder",
    "Manifest",
    "MaskGenerator",
    "MaskSampler",
    "MultiCropAugmentation",
    "PositionBatchSampler",
    "PositionSampler",
    "SSLDataset",
    "blur_kernel_size",
    "build_dataset",
    "build_ssl_loader",
    "collate_ssl",
    "derive_seed",
    "load_image",
    "sample_mask",
]
