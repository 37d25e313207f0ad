"""Empirical patch attacks and benchmarks.

Every image-space attack derives from :class:`~bagcert.attacks.base.PatchAttack`, whose public call enforces
the threat model (changes only inside one patch mask, values in [0, 1], success recomputed with the real
model, the model's mode and ``requires_grad`` flags restored). See ``docs/attacks.md``.

* :mod:`bagcert.attacks.pgd`: per-image patch PGD (random or certificate-guided placement) on a differentiable
  surrogate of the vote aggregation.
* :mod:`bagcert.attacks.universal`: a universal patch trained with expectation over location, rotation and
  scale (Brown et al. 2017).
* :mod:`bagcert.attacks.feature_space`: the worst case in feature space for every patch position (equal to
  the certificate, exactly).
* :mod:`bagcert.attacks.imagenet_patch`: the ImageNet-Patch set (Pintor et al., Pattern Recognition 2023; data
  CC BY 4.0) -- loaded through a pickle allow-list, applied with one random pose per image, and evaluated;
  :mod:`bagcert.attacks.imagenet_patch_attack` wraps it as a :class:`PatchAttack`.
"""

from .base import AttackResult, PatchAttack, ThreatModelError, mask_bounding_boxes, model_predict, rectangle_masks, restore_model_state
from .feature_space import FeatureSpaceResult, FeatureSpaceWorstCase, feature_space_worst_case
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
from .imagenet_patch_attack import IMAGENETTE_WNIDS, ImageNetPatchAttack, imagenet_label_mapping
from .pgd import SURROGATES, PatchPGD, adaptive_positions, class_margin, random_positions, surrogate_scores
from .universal import UniversalPatch, place_patch, sample_poses

__all__ = [
    "AttackResult",
    "FeatureSpaceResult",
    "FeatureSpaceWorstCase",
    "IMAGENET_PATCH_SHA256",
    "IMAGENET_PATCH_TARGETS",
    "IMAGENETTE_CLASS_INDICES",
    "IMAGENETTE_WNIDS",
    "ImageNetPatch",
    "ImageNetPatchAttack",
    "PatchApplier",
    "PatchAttack",
    "PatchFileError",
    "PatchPGD",
    "SURROGATES",
    "ThreatModelError",
    "UniversalPatch",
    "adaptive_positions",
    "apply_patch",
    "class_margin",
    "default_imagenet_patch_path",
    "evaluate_imagenet_patch",
    "feature_space_worst_case",
    "imagenet_label_mapping",
    "load_imagenet_patch",
    "mask_bounding_boxes",
    "model_predict",
    "place_patch",
    "random_positions",
    "rectangle_masks",
    "restore_model_state",
    "sample_poses",
    "surrogate_scores",
]
