"""Empirical patch attacks and benchmarks.

* :mod:`bagcert.attacks.imagenet_patch`: the ImageNet-Patch set (Pintor et al., Pattern Recognition 2023; data
  CC BY 4.0) -- loaded through a pickle allow-list, applied with one random pose per image, and evaluated.
"""

from .imagenet_patch import (
    IMAGENET_PATCH_SHA256,
    IMAGENET_PATCH_TARGETS,
    IMAGENETTE_CLASS_INDICES,
    ImageNetPatch,
    PatchApplier,
    PatchFileError,
    apply_patch,
    default_imagenet_patch_path,
    evaluate_imagenet_patch,
    load_imagenet_patch,
)

__all__ = [
    "IMAGENET_PATCH_SHA256",
    "IMAGENET_PATCH_TARGETS",
    "IMAGENETTE_CLASS_INDICES",
    "ImageNetPatch",
    "PatchApplier",
    "PatchFileError",
    "apply_patch",
    "default_imagenet_patch_path",
    "evaluate_imagenet_patch",
    "load_imagenet_patch",
]
