"""Datasets as in-memory uint8 tensors, and batch augmentation on tensors.

Small datasets are decoded once into a uint8 tensor [N, 3, H, W] (and cached on disk as ``.pt``
files of plain tensors), then augmented a whole batch at a time, so the CPU cores go to the model
instead of per-image PIL work.

Supported layouts:

* CIFAR-10 as torchvision's ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``).
* CIFAR-10 (or any 32x32 set) as image folders ``<root>/<split>/<class>/<image>`` (ImageFolder).
  The offline copy in ``../shared/data/cifar10`` is JPEG quality 75: reports call it
  "CIFAR-10 (JPEG q75 copy)".
* ImageNet-style folders ``<root>/<class>/<image>`` (or ``<root>/<split>/<class>/<image>``),
  resized (shorter side) and centre-cropped.
* A seeded synthetic dataset.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .imagenet_a import IMAGENET_A_INDICES  # noqa: F401  (re-export)

__all__ = [
    "IMAGENET_A_INDICES",
    "Dataset",
    "DatasetError",
    "load_cifar10",
    "load_image_folder",
    "synthetic_dataset",
    "seeded_split",
    "augment_batch",
    "load_dataset",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_NAME",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_JPEG_NAME = "CIFAR-10 (JPEG q75 copy)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder is missing or does not have the expected layout."""


@dataclass
class Dataset:
    """Images as uint8 [N, 3, H, W], labels long [N], plus provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    name: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index) -> "Dataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.images[index], self.labels[index], self.classes, self.name, dict(self.info, subset=len(index)))

    def float_images(self, index=None) -> torch.Tensor:
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)


# --- caching ---------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("BAGCERT_CACHE", Path.home() / ".cache" / "bagcert"))


def _cache_key(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]


def _cached(key: str, build):
    """Return ``build()`` (a dict of tensors and builtins), caching it as a weights-only .pt file."""
    from .checkpoint import CheckpointError, atomic_torch_save, safe_torch_load

    path = _cache_dir() / f"{key}.pt"
    if path.is_file():
        try:
            return safe_torch_load(path, "dataset cache")
        except CheckpointError:
            pass  # a stale or broken cache entry is rebuilt below
    obj = build()
    try:
        atomic_torch_save(obj, path)
    except OSError:
        pass  # read-only home: work without the cache
    return obj


# --- CIFAR-10 ---------------------------------------------------------------------------------
def _find_cifar_batches(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts with numpy arrays: allow exactly those globals."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to unpickle {module}.{name} from a CIFAR batch file: only numpy arrays are expected")


def _read_cifar_batch(path: Path):
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    return data, labels


def _list_image_folder(root: Path):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(i)
    return classes, files, labels


def _decode_folder(root: Path, size=None, resize=None):
    """Decode an ImageFolder into uint8 [N, 3, h, w]; resize shorter side then centre-crop if asked."""
    from PIL import Image

    classes, files, labels = _list_image_folder(root)
    if not files:
        raise DatasetError(f"no images found under {root}; expected ImageFolder layout {root}/<class>/<image>.jpg")
    out = None
    for k, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if resize is not None:
                w, h = im.size
                s = resize / min(w, h)
                im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
            if size is not None:
                w, h = im.size
                if w < size or h < size:
                    raise DatasetError(f"{f} is {w}x{h}, smaller than the crop {size}; give a resize >= {size}")
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
        if out is None:
            out = np.empty((len(files),) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DatasetError(
                f"{f} has size {arr.shape[1]}x{arr.shape[0]} but earlier images are {out.shape[2]}x{out.shape[1]}; "
                "give resize/crop sizes to load images of mixed sizes"
            )
        out[k] = arr
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "labels": torch.tensor(labels, dtype=torch.long), "classes": classes}


def load_cifar10(root, split: str = "test") -> Dataset:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` layout or from ``<root>/<split>/<class>/*.jpg``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"CIFAR-10 folder not found: {root}. Expected either torchvision's 'cifar-10-batches-py' folder "
            "(data_batch_1..5, test_batch) or image folders <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg"
        )
    batches = _find_cifar_batches(root)
    if batches is not None:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = [_read_cifar_batch(batches / n) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        return Dataset(images, labels, list(CIFAR10_CLASSES), "CIFAR-10", {"root": str(batches), "split": split, "layout": "cifar-10-batches-py"})
    folder = root / split
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise DatasetError(
            f"{root} has neither torchvision's CIFAR-10 layout (cifar-10-batches-py/data_batch_1..5, test_batch) "
            f"nor an image folder {folder}/<class>/<image>; expected one of those layouts"
        )
    key = _cache_key("cifar-folder", folder.resolve(), folder.stat().st_mtime_ns, len(list(folder.iterdir())))
    obj = _cached(key, lambda: _decode_folder(folder))
    images, labels, classes = obj["images"], obj["labels"], obj["classes"]
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise DatasetError(f"{folder} holds {tuple(images.shape[2:])} images; CIFAR-10 images are 32x32")
    name = CIFAR10_JPEG_NAME if _looks_jpeg(folder) else "CIFAR-10 (image folders)"
    return Dataset(images, labels, list(classes), name, {"root": str(folder), "split": split, "layout": "image-folder"})


def _looks_jpeg(folder: Path) -> bool:
    for c in folder.iterdir():
        if c.is_dir():
            for f in c.iterdir():
                return f.suffix.lower() in (".jpg", ".jpeg")
    return False


def load_image_folder(root, size: int = 224, resize: int | None = None, split: str | None = None) -> Dataset:
    """ImageNet-style ImageFolder: ``<root>/<class>/<image>`` (or ``<root>/<split>/<class>/<image>``).

    Each image's shorter side is resized to ``resize`` (default ``round(size * 256 / 224)``) and the
    centre ``size`` x ``size`` crop kept.
    """
    root = Path(root)
    if split is not None:
        root = root / split
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}; expected ImageFolder layout <root>/<class>/<image>.jpg")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DatasetError(f"{root} has no class sub-folders; expected ImageFolder layout <root>/<class>/<image>.jpg")
    resize = resize if resize is not None else round(size * 256 / 224)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= the crop size ({size})")
    key = _cache_key("folder", root.resolve(), root.stat().st_mtime_ns, size, resize)
    obj = _cached(key, lambda: _decode_folder(root, size=size, resize=resize))
    return Dataset(obj["images"], obj["labels"], list(obj["classes"]), root.name, {"root": str(root), "size": size, "resize": resize, "layout": "image-folder",
                                                                          **({"split": split} if split else {})})


def synthetic_dataset(n: int = 64, num_classes: int = 10, size: int = 32, seed: int = 0) -> Dataset:
    """Random uint8 images with class-dependent colour shifts (learnable, for tests and smoke runs).

    The class colours are the same for every seed, so a train set and a test set drawn with
    different seeds come from one distribution.
    """
    base = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, 3, size, size, generator=g)
    images = (0.5 * noise + 0.5 * base[labels]).mul(255).round().to(torch.uint8)
    return Dataset(images, labels, [f"class{i}" for i in range(num_classes)], "synthetic", {"seed": seed, "n": n})


def seeded_split(n: int, test_fraction: float, seed: int):
    """A reproducible (train_index, test_index) split of ``range(n)``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_fraction))
    return perm[k:].sort().values, perm[:k].sort().values


def load_dataset(spec: str, split: str = "test", size: int | None = None, resize: int | None = None, seed: int = 0, num_classes: int = 10) -> Dataset:
    """Resolve a dataset spec: ``synthetic``, ``cifar10:<root>`` or ``folder:<root>``; a bare path is
    CIFAR-10 if it holds a CIFAR layout, otherwise an ImageNet-style folder."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 256
        return synthetic_dataset(n, num_classes, size or 32, seed + (0 if split == "train" else 1))
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("cifar10", "folder") else ("", "", spec)
    root = Path(path)
    if kind == "cifar10" or (not kind and (_find_cifar_batches(root) or _is_cifar_folder(root, split))):
        return load_cifar10(root, split)
    if (root / split).is_dir():
        return load_image_folder(root, size or 224, resize, split=split)
    return load_image_folder(root, size or 224, resize)


def load_checkpoint_split(spec: str, split: str, split_record: dict | None, size: int | None = None, resize: int | None = None,
                          seed: int = 0, num_classes: int = 10) -> Dataset:
    """Load ``split`` of a dataset the way a checkpoint saw it.

    A dataset with split folders (CIFAR-10, ``<root>/<split>/<class>/...``) is returned as stored. A
    folder without split folders was cut at training time with a seeded split, recorded in the
    checkpoint's metadata as ``split_record`` (``{"seed", "test_fraction", "num_images"}``, see
    ``bagcert.training.dataset_metadata``): ``split="test"`` or ``"train"`` then returns that part, so
    that a model is never evaluated on the images it was trained on, and ``"all"`` every image. A
    folder whose image count differs from the record is not the training folder: its ``"test"`` /
    ``"train"`` parts do not exist and asking for them is a :class:`DatasetError` (ask for ``"all"``).
    Without a record (a model trained elsewhere) the folder is returned whole for any split name, and
    ``info["split"]`` says ``"all"``.
    """
    root = Path(spec.split(":", 1)[1] if spec.split(":", 1)[0] in ("cifar10", "folder") else spec)
    has_split_folder = (root / split).is_dir()
    if split == "all" and not has_split_folder:
        data = load_dataset(spec, "test", size=size, resize=resize, seed=seed, num_classes=num_classes)
        if data.info.get("split") is not None:
            raise DatasetError(f"{spec} has split folders ({data.info['split']!r} ...): name one of them, not 'all'")
        data.info["split"] = "all"
        return data
    data = load_dataset(spec, split, size=size, resize=resize, seed=seed, num_classes=num_classes)
    if data.info.get("layout") != "image-folder" or has_split_folder:
        return data
    if not split_record:
        data.info["split"] = "all"
        return data
    return cut_seeded_split(data, split, split_record, spec)


def cut_seeded_split(data: Dataset, split: str, split_record: dict, name: str = "the folder") -> Dataset:
    """The ``split`` part (``"test"`` or ``"train"``) of a whole folder ``data``, cut with a checkpoint's
    seeded split record (see :func:`load_checkpoint_split`); a folder of another size is a :class:`DatasetError`."""
    if split not in ("test", "train"):
        raise DatasetError(f"split must be test, train or all for a folder without split folders, got {split!r}")
    n = int(split_record["num_images"])
    if len(data) != n:
        raise DatasetError(
            f"{name} has {len(data)} images but the checkpoint's seeded split was made over {n}: not the folder it "
            f"was trained on, so it has no {split!r} part (use split 'all' to take every image)"
        )
    tr, te = seeded_split(n, float(split_record["test_fraction"]), int(split_record["seed"]))
    data = data.subset(te if split == "test" else tr)
    data.info["split"] = split
    data.info["seeded_split"] = {k: split_record[k] for k in ("seed", "test_fraction", "num_images") if k in split_record}
    return data


def _is_cifar_folder(root: Path, split: str) -> bool:
    folder = root / split
    if not folder.is_dir():
        return False
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return classes == sorted(CIFAR10_CLASSES)


# --- batch augmentation -----------------------------------------------------------------------
def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    flip: bool = True,
    pad: int = 4,
    cutout: int = 0,
    rows: torch.Tensor | None = None,
    global_size: int | None = None,
    crop: int | None = None,
) -> torch.Tensor:
    """Random flips, pad-and-crop (zero padding) and optional cutout on a whole batch [B, C, H, W].

    ``crop``: output side; a random ``crop`` x ``crop`` window of the (padded) image is kept, so images
    stored larger than the model's input (e.g. 146 px for a 128 px model) get random translations
    without any zero border. None keeps the input size (the classic pad-and-crop).

    Works on uint8 or float tensors; all randomness comes from ``generator`` (reproducible).
    Under data parallelism, pass the rows of the global batch this process holds (``rows``) and
    the global batch size: the random draws are made for the whole global batch, so every sample
    gets the same augmentation as in a single-process run.
    """
    B, C, H, W = x.shape
    n = B if global_size is None else global_size
    sel = torch.arange(B) if rows is None else rows
    if crop is not None and not 1 <= crop <= min(H, W) + 2 * pad:
        raise ValueError(f"crop {crop} must lie in [1, {min(H, W) + 2 * pad}] for {H}x{W} images with pad {pad}")
    if flip:
        f = (torch.rand(n, generator=generator) < 0.5)[sel]
        x = torch.where(f.view(B, 1, 1, 1).to(x.device), x.flip(3), x)
    if pad > 0 or (crop is not None and (crop, crop) != (H, W)):
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
        Ho, Wo = (H, W) if crop is None else (crop, crop)
        dy = torch.randint(0, H + 2 * pad - Ho + 1, (n,), generator=generator)[sel].to(x.device)
        dx = torch.randint(0, W + 2 * pad - Wo + 1, (n,), generator=generator)[sel].to(x.device)
        H, W = Ho, Wo
        r = dy.view(B, 1) + torch.arange(H, device=x.device).view(1, H)  # [B, H]
        c = dx.view(B, 1) + torch.arange(W, device=x.device).view(1, W)  # [B, W]
        bidx = torch.arange(B, device=x.device).view(B, 1, 1)
        x = xp.permute(0, 2, 3, 1)[bidx, r.view(B, H, 1), c.view(B, 1, W)].permute(0, 3, 1, 2)
    if cutout > 0:
        cy = torch.randint(0, H, (n,), generator=generator)[sel].to(x.device)
        cx = torch.randint(0, W, (n,), generator=generator)[sel].to(x.device)
        r = torch.arange(H, device=x.device).view(1, H, 1)
        c = torch.arange(W, device=x.device).view(1, 1, W)
        half = cutout // 2
        m = ((r - cy.view(B, 1, 1)).abs() <= half) & ((c - cx.view(B, 1, 1)).abs() <= half)
        x = x.masked_fill(m.unsqueeze(1), 0)
    return x.contiguous()
