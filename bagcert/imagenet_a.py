"""ImageNet-A: loading the ``imagenet-a/<wnid>/<image>`` folder and evaluating ImageNet-1k models on it.

ImageNet-A (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021; data and reference code
in hendrycks/natural-adv-examples, MIT) holds 7,500 real, unmodified images in 200 of the 1000
ImageNet-1k classes, one folder per class named by its WordNet id (``n`` + 8 digits). The protocol,
re-implemented here from its description:

* sorted wnid folder j is ImageNet-1k class ``IMAGENET_A_INDICES[j]``;
* a 1000-way model's logits are restricted to those 200 columns: the prediction is the argmax and
  the confidence the max softmax probability, both over the 200 columns only;
* metrics (see :mod:`bagcert.metrics`): top-1 accuracy, RMS calibration error with adaptive bins
  of 100 samples, and AURRA. Samples of equal confidence are handled as a group (the metrics do not
  depend on the order of the images); a metric that is undefined is ``None`` (JSON null).

The real ImageNet-A images are **not available in this environment** (no network, no local copy):
the loader and the evaluation are tested on small synthetic folders with the same
``<wnid>/<image>`` layout, built with PIL. No ImageNet-A number has been measured here.

Models trained on a subset of ImageNet classes (e.g. the 10 Imagenette classes) are evaluated with
:func:`evaluate_subset_model`, which matches classes by wnid and reports how much of the dataset
the model's classes cover.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from . import metrics

__all__ = [
    "IMAGENET_A_INDICES",
    "IMAGENET_A_NUM_CLASSES",
    "ImageNetA",
    "load_imagenet_a",
    "evaluate_imagenet_a",
    "evaluate_subset_model",
]

# Sorted wnid folder j of ImageNet-A is ImageNet-1k class IMAGENET_A_INDICES[j]
# (from the ImageNet-A reference evaluation, hendrycks/natural-adv-examples).
IMAGENET_A_INDICES: tuple[int, ...] = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107, 108, 110,
    113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307, 308,
    309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397,
    400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486,
    488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607,
    609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763,
    765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847,
    850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956,
    957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)
IMAGENET_A_NUM_CLASSES = 200
assert len(IMAGENET_A_INDICES) == IMAGENET_A_NUM_CLASSES
assert all(a < b for a, b in zip(IMAGENET_A_INDICES, IMAGENET_A_INDICES[1:])), "indices must be strictly increasing"
assert 0 <= IMAGENET_A_INDICES[0] and IMAGENET_A_INDICES[-1] < 1000

_WNID = re.compile(r"n\d{8}")
_LAYOUT = "imagenet-a/<wnid>/<image> (one folder per class named by its WordNet id, e.g. n01498041/0.000116_digital clock _ digital clock_0.865662.jpg)"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ImageNetA(NamedTuple):
    """What :func:`load_imagenet_a` returns (unpacks as ``images, labels, wnids``).

    images: uint8 [N, 3, size, size].
    labels: long [N], the position of each image's class in the 200-class ImageNet-A order
        (0..199), so ``IMAGENET_A_INDICES[labels[i]]`` is its ImageNet-1k index.
    wnids: list of 200 entries, ``wnids[labels[i]]`` is image i's wnid. For a subset loaded with an
        ``indices`` dict the wnids of classes absent from the folder are unknown and are ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    wnids: list


def _dataset_error(message: str):
    from .data import DatasetError  # imported lazily: bagcert.data may import this module

    return DatasetError(message)


def _wnid_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise _dataset_error(f"ImageNet-A folder not found: {root}. Expected the layout {_LAYOUT}")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    others = [d for d in subdirs if not _WNID.fullmatch(d)]
    if others or not subdirs:
        hint = ""
        if "imagenet-a" in others:
            hint = f" (did you mean {root / 'imagenet-a'}?)"
        what = f"sub-folders that are not wnids: {others[:5]}" if others else "no class sub-folders"
        raise _dataset_error(f"{root} has {what}{hint}. Expected the layout {_LAYOUT}")
    return subdirs


def _decode(path: Path, size: int, resize: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def load_imagenet_a(
    root,
    size: int = 224,
    resize: int = 256,
    wnids: Sequence[str] | None = None,
    allow_subset: bool = False,
    indices: Mapping[str, int] | None = None,
) -> ImageNetA:
    """Load ImageNet-A from ``root/<wnid>/<image>`` into memory.

    Each image is converted to RGB, its shorter side resized to ``resize`` (bilinear) and the centre
    ``size`` x ``size`` crop kept. Files whose extension is not an image extension are skipped;
    so are files directly under ``root`` (the release has a README there).

    How folders map to the 200 classes (``labels`` are positions 0..199 in the ImageNet-A order,
    so that :func:`evaluate_imagenet_a` can pick ``IMAGENET_A_INDICES[label]``):

    * default (``wnids=None``, ``indices=None``): the sorted wnid folders *are* the 200 classes, in
      order; exactly 200 wnid folders are required, anything else is a :class:`DatasetError`.
    * ``wnids``: the full list of the 200 ImageNet-A wnids in their order (if you have it, e.g. from
      a complete copy); each folder's label is its position in that list.
    * ``indices``: a dict wnid -> ImageNet-1k index (one of ``IMAGENET_A_INDICES``) for every folder
      present; the label is that index's position in ``IMAGENET_A_INDICES``.

    Fewer than 200 folders (a partial copy, or a synthetic test folder) need ``allow_subset=True``
    together with ``wnids`` or ``indices``: the list of the 200 ImageNet-A wnids is not available
    offline, so a subset cannot be placed without one of them. The real images are not available in
    this environment; the tests use synthetic folders of the same layout.

    Returns:
        :class:`ImageNetA` ``(images uint8 [N, 3, size, size], labels long [N], wnids)`` where
        ``wnids`` has 200 entries and ``wnids[label]`` is the class's wnid (``None`` for classes
        absent from the folder whose wnid is unknown, possible only with ``indices``).

    Raises:
        DatasetError (a ValueError, from :mod:`bagcert.data`): missing folder, wrong layout, wrong
            number of class folders, no images, or a mapping that does not cover the folders.
        ValueError: bad ``size``/``resize`` or both ``wnids`` and ``indices`` given.
    """
    if size < 1 or resize < size:
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    if wnids is not None and indices is not None:
        raise ValueError("give either wnids (the full 200-wnid list) or indices (wnid -> 1k index), not both")
    root = Path(root)
    folders = _wnid_folders(root)
    n_cls = IMAGENET_A_NUM_CLASSES
    if len(folders) > n_cls:
        raise _dataset_error(f"{root} has {len(folders)} wnid folders; ImageNet-A has {n_cls}. Expected the layout {_LAYOUT}")
    if len(folders) < n_cls and not allow_subset:
        raise _dataset_error(
            f"{root} has {len(folders)} wnid folders; ImageNet-A has {n_cls} (layout {_LAYOUT}). "
            "To load a subset pass allow_subset=True with wnids=<the 200 wnids> or indices={wnid: 1k index}"
        )

    if wnids is not None:
        full = [str(w) for w in wnids]
        if len(full) != n_cls or len(set(full)) != n_cls or not all(_WNID.fullmatch(w) for w in full):
            raise ValueError(f"wnids must be {n_cls} distinct wnids (n + 8 digits), got {len(full)} entries ({len(set(full))} distinct)")
        missing = [f for f in folders if f not in full]
        if missing:
            raise _dataset_error(f"{root} has wnid folders that are not in the given wnids list: {missing[:5]}")
        position = {w: full.index(w) for w in folders}
        out_wnids: list = full
    elif indices is not None:
        lookup = {k: j for j, k in enumerate(IMAGENET_A_INDICES)}
        missing = [f for f in folders if f not in indices]
        if missing:
            raise _dataset_error(f"indices has no 1k index for the wnid folders {missing[:5]} under {root}")
        bad = {f: indices[f] for f in folders if int(indices[f]) not in lookup}
        if bad:
            raise _dataset_error(f"indices maps wnids to 1k classes that are not ImageNet-A classes: {dict(list(bad.items())[:5])}")
        position = {f: lookup[int(indices[f])] for f in folders}
        if len(set(position.values())) != len(folders):
            raise _dataset_error("indices maps two wnid folders to the same ImageNet-1k class")
        out_wnids = [None] * n_cls
        for f, j in position.items():
            out_wnids[j] = f
    else:
        if allow_subset and len(folders) < n_cls:
            raise ValueError(
                f"{root} holds {len(folders)} of the {n_cls} classes: a subset needs wnids=<the 200 wnids> or "
                "indices={wnid: 1k index} to place each folder among the 200 classes"
            )
        position = {f: j for j, f in enumerate(folders)}
        out_wnids = list(folders)

    files, labels = [], []
    for f in folders:
        for p in sorted((root / f).iterdir()):
            if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(position[f])
    if not files:
        raise _dataset_error(f"no images found under {root}; expected the layout {_LAYOUT}")
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for k, p in enumerate(files):
        try:
            images[k] = _decode(p, size, resize)
        except OSError as e:
            raise _dataset_error(f"cannot decode image {p}: {e}") from None
    return ImageNetA(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(labels, dtype=torch.long),
        out_wnids,
    )


def _check_images_labels(images: torch.Tensor, labels, num_classes: int, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.numel()}) differ in length")
    if labels.numel() == 0:
        raise ValueError("no images to evaluate")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be {what} in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _as_float01(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _predict(logits_fn, images, columns, batch_size: int, num_classes: int | None = None):
    """Argmax and max-softmax over ``columns`` (a long tensor, or None for all) of ``logits_fn``.

    With ``num_classes`` the logits must have exactly that many columns."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preds, confs = [], []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = _as_float01(images[s : s + batch_size])
            logits = logits_fn(x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"logits_fn must return logits [B, classes] for a batch of {x.shape[0]}, got {getattr(logits, 'shape', type(logits))}")
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"logits_fn returned {logits.shape[1]} classes, expected {num_classes} (one per model wnid)")
            if columns is not None:
                if logits.shape[1] <= int(columns.max()):
                    raise ValueError(f"logits_fn returned {logits.shape[1]} classes; the class indices need at least {int(columns.max()) + 1} (ImageNet-1k logits, 1000)")
                logits = logits[:, columns.to(logits.device)]
            prob = torch.softmax(logits.float(), dim=1)
            conf, pred = prob.max(dim=1)
            # argmax of the logits (first maximum) rather than of the rounded probabilities
            preds.append(logits.argmax(dim=1).cpu())
            confs.append(conf.cpu())
    return torch.cat(preds), torch.cat(confs)


def _summary(pred: torch.Tensor, conf: torch.Tensor, labels: torch.Tensor, bin_size: int) -> dict:
    correct = (pred == labels).numpy()
    conf = conf.double().clamp_(0.0, 1.0).numpy()
    return {
        "accuracy": metrics.accuracy(pred, labels),
        "calibration_error": metrics.calibration_error(conf, correct, bin_size=bin_size, skip_last_bin=False),
        "calibration_error_reference": metrics.calibration_error(conf, correct, bin_size=bin_size, skip_last_bin=True),
        "aurra": metrics.aurra(conf, correct),
        "n": int(labels.numel()),
    }


def evaluate_imagenet_a(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels,
    class_indices: Sequence[int] = IMAGENET_A_INDICES,
    batch_size: int = 64,
    bin_size: int = 100,
) -> dict:
    """Evaluate an ImageNet-1k classifier on ImageNet-A with the 200-class protocol.

    ``logits_fn(x)`` takes a float batch [B, 3, H, W] with values in [0, 1] (uint8 ``images`` are
    divided by 255; float images are passed as they are) and returns ImageNet-1k logits [B, 1000].
    Only the columns ``class_indices`` are kept: the prediction is the argmax over them and the
    confidence the max softmax probability over them, so a higher logit in any other column is
    ignored. ``labels`` are positions 0..len(class_indices)-1 (as :func:`load_imagenet_a` returns).
    Runs under ``torch.no_grad()`` in batches of ``batch_size``.

    The real ImageNet-A images are not available in this environment; this function is tested with
    synthetic folders of the same layout and fake logits.

    Returns:
        dict with ``accuracy`` (top-1), ``calibration_error`` (RMS, adaptive bins of ``bin_size``,
        all bins), ``calibration_error_reference`` (the same without the last bin, as the reference
        loop does; ``None`` when n < 2 * bin_size, where no bin is left), ``aurra`` and ``n``
        (number of images). Floats in [0, 1]; ties in confidence are handled as in
        :mod:`bagcert.metrics`, so the values do not depend on the order of the images.
    """
    columns = torch.as_tensor(list(class_indices), dtype=torch.long)
    if columns.dim() != 1 or columns.numel() == 0 or int(columns.min()) < 0:
        raise ValueError("class_indices must be a non-empty list of non-negative class indices")
    labels = _check_images_labels(images, labels, columns.numel(), "positions in class_indices")
    pred, conf = _predict(logits_fn, images, columns, batch_size)
    return _summary(pred, conf, labels, bin_size)


def evaluate_subset_model(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels,
    model_wnids: Sequence[str],
    dataset_wnids: Sequence[str | None],
    batch_size: int = 64,
    bin_size: int = 100,
) -> dict:
    """Evaluate a model trained on a subset of ImageNet classes (e.g. Imagenette's 10) by wnid.

    ``logits_fn(x)`` returns logits [B, len(model_wnids)] over the model's own classes, column c
    being ``model_wnids[c]``. Image i's class is ``dataset_wnids[labels[i]]`` (``None`` entries are
    classes of unknown wnid, never covered). Only images whose wnid the model knows are evaluated
    ("covered"); on them the prediction is the argmax over the model's classes and the confidence
    the max softmax probability over them.

    The real ImageNet-A images are not available in this environment; this function is tested with
    synthetic data.

    Returns:
        dict with

        * ``classes_covered`` / ``classes_total`` / ``class_coverage``: dataset classes (those with at
          least one image) whose wnid the model knows, out of all dataset classes with images;
        * ``images_covered`` / ``images_total`` / ``image_coverage``: the same counted in images;
        * ``accuracy``, ``calibration_error``, ``calibration_error_reference``, ``aurra``, ``n``: as
          in :func:`evaluate_imagenet_a`, on the covered images only (``n = images_covered``); these
          are ``None`` when no image is covered (``n = 0``), and ``calibration_error_reference`` is
          ``None`` when fewer than ``2 * bin_size`` images are covered;
        * ``accuracy_all_images``: correct covered predictions / all images (uncovered images count
          as wrong), 0.0 when nothing is covered;
        * ``covered_wnids``: the sorted wnids of the covered classes.
    """
    model_wnids = [str(w) for w in model_wnids]
    if not model_wnids or len(set(model_wnids)) != len(model_wnids):
        raise ValueError("model_wnids must be a non-empty list of distinct wnids")
    dataset_wnids = list(dataset_wnids)
    labels = _check_images_labels(images, labels, len(dataset_wnids), "positions in dataset_wnids")
    model_pos = {w: c for c, w in enumerate(model_wnids)}
    # dataset class -> model class, or -1 when the model does not know it
    to_model = torch.tensor([model_pos.get(w, -1) if w is not None else -1 for w in dataset_wnids], dtype=torch.long)
    present = torch.unique(labels)
    covered_classes = present[to_model[present] >= 0]
    target = to_model[labels]
    keep = target >= 0
    n_total, n_cov = int(labels.numel()), int(keep.sum())
    out = {
        "classes_covered": int(covered_classes.numel()),
        "classes_total": int(present.numel()),
        "class_coverage": covered_classes.numel() / present.numel(),
        "images_covered": n_cov,
        "images_total": n_total,
        "image_coverage": n_cov / n_total,
        "covered_wnids": sorted(dataset_wnids[int(j)] for j in covered_classes),
    }
    if n_cov == 0:
        out.update(accuracy=None, calibration_error=None, calibration_error_reference=None, aurra=None, n=0, accuracy_all_images=0.0)
        return out
    idx = keep.nonzero().flatten()
    pred, conf = _predict(logits_fn, images[idx], None, batch_size, num_classes=len(model_wnids))
    out.update(_summary(pred, conf, target[idx], bin_size))
    out["accuracy_all_images"] = int((pred == target[idx]).sum()) / n_total
    return out
