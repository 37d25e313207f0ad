"""ImageNet-Patch as a :class:`~bagcert.attacks.base.PatchAttack`: each image gets each of the 10 patches with
its own random pose (:func:`~bagcert.attacks.imagenet_patch.apply_patch`); an image counts as broken when any
patch changes the prediction away from the label.

The patches are not optimised against the model under test (a transfer attack) and are larger than the
usual certified patch: 50 px on a 224 px image before a random scale of 0.7-1 and a rotation of up to 45
degrees, so their bounding box is 35 to 71 px. ``in_threat_model`` records, per image, whether the pasted patch
fits in the certified ``patch_size`` rectangle; only those images enter the soundness check.

The patches target ImageNet-1k classes and were made for 224 px ImageNet models: :func:`imagenet_label_mapping`
decides from the checkpoint metadata whether a model is ImageNet-like.
"""

from __future__ import annotations

import re

import torch

from .base import PatchAttack
from .imagenet_patch import IMAGENETTE_CLASS_INDICES, ImageNetPatch, PatchApplier, load_imagenet_patch

__all__ = ["IMAGENETTE_WNIDS", "ImageNetPatchAttack", "imagenet_label_mapping"]

#: Imagenette's wnids in label order (sorted), matching :data:`IMAGENETTE_CLASS_INDICES`.
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)
_WNID = re.compile(r"n\d{8}")


def imagenet_label_mapping(metadata: dict | None, classes=None, num_classes: int | None = None):
    """Is the model ImageNet-like, and which ImageNet-1k index is each of its labels?

    Returns ``(applicable, label_to_imagenet, reason)``: ``label_to_imagenet`` is a list (one ImageNet-1k index
    per model label), or None when the labels are ImageNet-1k indices themselves (1000 classes) or unknown.
    Evidence, in order: ``metadata['imagenet_indices']``; class names that are the Imagenette wnids; class names
    that are wnids (applicable, mapping unknown); 1000 classes (identity).
    """
    metadata = metadata or {}
    classes = list(classes) if classes is not None else list(metadata.get("classes") or [])
    indices = metadata.get("imagenet_indices")
    if indices is not None:
        indices = [int(v) for v in indices]
        if num_classes is not None and len(indices) != num_classes:
            return False, None, f"checkpoint metadata lists {len(indices)} imagenet_indices for {num_classes} classes"
        return True, indices, "checkpoint metadata 'imagenet_indices'"
    if classes and all(isinstance(c, str) and _WNID.fullmatch(c) for c in classes):
        if tuple(classes) == IMAGENETTE_WNIDS:
            return True, list(IMAGENETTE_CLASS_INDICES), "class names are the Imagenette wnids"
        return True, None, "class names are ImageNet wnids (no index mapping: targeted success not measured)"
    if num_classes == 1000:
        return True, None, "1000 classes, taken as ImageNet-1k indices"
    return False, None, (
        "the model's classes are not ImageNet classes (no 'imagenet_indices' in the checkpoint metadata, no wnid "
        "class names, not 1000 classes): the ImageNet-Patch patches target ImageNet-1k classes of 224 px models"
    )


class ImageNetPatchAttack(PatchAttack):
    """All 10 ImageNet-Patch patches, one random pose per image and patch; worst case over patches.

    Args:
        patch_set: a loaded :class:`~bagcert.attacks.imagenet_patch.ImageNetPatch` (or give ``path``).
        path: the ``imagenet_patch.gz`` file (default location when both are None).
        label_to_imagenet: ImageNet-1k index per model label, for the targeted success rate (None: the labels
            are ImageNet-1k indices when the model has 1000 classes, else targeted success is not measured).
        applier: pose parameters (default :class:`~bagcert.attacks.imagenet_patch.PatchApplier`).
        patch_size: the certified patch size the masks are compared with.
    """

    name = "imagenet-patch"
    enforces_patch_size = False

    def __init__(self, patch_set: ImageNetPatch | None = None, path=None, label_to_imagenet=None, applier: PatchApplier | None = None,
                 patch_size=None, seed: int = 0, batch_size: int = 64):
        super().__init__(patch_size, seed=seed, batch_size=batch_size)
        self.patch_set = patch_set if patch_set is not None else load_imagenet_patch(path)
        self.label_to_imagenet = None if label_to_imagenet is None else [int(v) for v in label_to_imagenet]
        self.applier = applier if applier is not None else PatchApplier()

    def settings(self) -> dict:
        return dict(super().settings(), patches=len(self.patch_set), application=self.applier.params(),
                    file_sha256=self.patch_set.sha256)

    def _target_label(self, target: int, num_classes: int):
        if self.label_to_imagenet is not None:
            return self.label_to_imagenet.index(target) if target in self.label_to_imagenet else None
        return target if num_classes == 1000 else None

    def _attack(self, model, images, labels, patch_size, generator):
        N = images.shape[0]
        best_adv, best_mask = images.clone(), torch.zeros_like(images[:, :1])
        done = torch.zeros(N, dtype=torch.bool, device=images.device)
        per_patch = []
        with torch.no_grad():
            for index in range(len(self.patch_set)):
                target_label = self._target_label(int(self.patch_set.targets[index]), getattr(model, "num_classes", 0))
                preds, first_adv, first_mask = [], [], []
                for i0 in range(0, N, self.batch_size):
                    x = images[i0 : i0 + self.batch_size]
                    xa, m = self.applier(x, index, generator=generator, return_masks=True, patch_set=self.patch_set)
                    m = (m > 0.5).to(images.dtype)  # nearest resampling of a binary mask: already {0, 1}
                    preds.append(model(xa).argmax(1))
                    first_adv.append(xa)
                    first_mask.append(m)
                pred = torch.cat(preds)
                xa, m = torch.cat(first_adv), torch.cat(first_mask)
                succ = pred != labels
                new = succ & ~done
                best_adv[new], best_mask[new] = xa[new], m[new]
                keep = ~done & ~succ  # not yet broken: remember this patch's image as the latest try
                if index == 0:
                    best_adv[keep], best_mask[keep] = xa[keep], m[keep]
                done |= succ
                per_patch.append({
                    "index": index,
                    "target": int(self.patch_set.targets[index]),
                    "success_rate_on_correct": float(succ.float().mean()),
                    "targeted_success_rate_on_correct": None if target_label is None else float((pred == target_label).float().mean()),
                })
        positions = torch.zeros(N, 2, dtype=torch.long, device=images.device)
        return best_adv, best_mask, positions, {"per_patch": per_patch}
