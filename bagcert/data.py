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

Decoding rules (every image file, :func:`decode_image`):

* The file must be a regular file (symlinks are followed) that Pillow decodes completely; an empty,
  truncated, foreign or otherwise undecodable file is a :class:`DatasetError` naming it. PNG files are
  also checked chunk by chunk (CRCs, the closing ``IEND`` chunk).
* Colour: RGB is kept; grayscale (``L``, ``1``) is copied to the three channels; an alpha channel
  (``RGBA``, ``LA``, ``PA``, a palette with transparency) is **dropped**, not composited, which is what
  torchvision's ``ImageFolder`` loader (``img.convert("RGB")``) does; palette images take their palette
  colours; ``CMYK`` and ``YCbCr`` go through Pillow's plain conversion (no ICC profile). 16-bit samples
  keep their high byte (``v >> 8``), for grayscale (``I;16*``) as Pillow itself does for 16-bit RGB(A)
  PNGs. 32-bit integer (``I``) and float (``F``) images have no defined 8-bit mapping and are refused.
  EXIF orientation is not applied (as in torchvision's loader).
* Size (ImageNet-style folders): the shorter side is resized to ``resize`` (up or down, bilinear with
  Pillow's antialiasing; the longer side ``round(long * resize / short)``), then the centre
  ``size`` x ``size`` crop is kept (offset ``(side - size) // 2``). ``resize >= size`` is required, so an
  image smaller than the crop is always enlarged, never padded (torchvision's ``Resize`` +
  ``CenterCrop`` reference transform does the same). CIFAR-style folders are not resized: every image
  must already have the size of the first one.
* Limits (every path, the stream path's torchvision JPEG decoder included): an image over Pillow's
  decompression-bomb limit (``2 x PIL.Image.MAX_IMAGE_PIXELS`` pixels) is refused from its header
  (:func:`image_header_size`); an image the resize would enlarge more than :data:`MAX_UPSCALE` times is
  refused (:func:`check_upscale`), not enlarged from a few pixels without a word.

Decode cache: see :func:`cache_dir` and :func:`cache_enabled`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import time
import warnings
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
    "resolve_image_folder",
    "synthetic_dataset",
    "seeded_split",
    "stratified_subset",
    "augment_batch",
    "load_dataset",
    "load_checkpoint_split",
    "cut_seeded_split",
    "decode_image",
    "image_header_size",
    "check_upscale",
    "MAX_UPSCALE",
    "cache_dir",
    "cache_enabled",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_NAME",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_JPEG_NAME = "CIFAR-10 (JPEG q75 copy)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SPLIT_NAMES_HINT = "test, train or all"
#: The most an image is enlarged (target side / its shorter side) before it is refused (:func:`check_upscale`):
#: a 1 x 1 image resized to 146 px holds no picture to classify or certify.
MAX_UPSCALE = 16


class DatasetError(ValueError):
    """A dataset folder is missing, does not have the expected layout, or holds a file that is not a usable image."""


@dataclass
class Dataset:
    """Images as uint8 [N, 3, H, W], labels long [N], plus provenance.

    Provenance of image ``i``:

    * ``indices[i]`` (int64 tensor [N]): its index in the full dataset as loaded (the folder listing in
      class-then-file-name order, or torchvision's ``CIFAR10`` index for the batch layout, or the draw
      order of a synthetic set). :meth:`subset`, the seeded splits and :func:`stratified_subset` keep it,
      so it always points into the full dataset.
    * ``sources[i]`` (str): where the pixels came from. Image folders: the file's path relative to
      ``info["root"]`` in POSIX form (``"cat/0001.jpg"``); CIFAR batches: ``"<batch file>:<row>"``
      (``"test_batch:17"``); ``None`` (the whole field) for synthetic data.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    name: str
    info: dict = field(default_factory=dict)
    sources: list | None = None
    indices: torch.Tensor | None = None

    def __post_init__(self):
        n = int(self.labels.numel())
        if self.labels.dim() != 1 or self.images.shape[0] != n:
            raise ValueError(f"images [N, C, H, W] and labels [N] must agree: got {tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        if self.indices is None:
            self.indices = torch.arange(n, dtype=torch.long)
        else:
            self.indices = torch.as_tensor(self.indices, dtype=torch.long)
            if tuple(self.indices.shape) != (n,):
                raise ValueError(f"indices must have shape [{n}], got {tuple(self.indices.shape)}")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"sources must name {n} images, got {len(self.sources)}")

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index) -> "Dataset":
        """The images at ``index`` (int sequence or tensor; a bool mask [N] is taken as its True positions),
        in that order, with their labels, sources and full-dataset indices."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.long).flatten()
        sources = None if self.sources is None else [self.sources[i] for i in index.tolist()]
        return Dataset(self.images[index], self.labels[index], self.classes, self.name, dict(self.info, subset=len(index)),
                       sources, self.indices[index])

    def float_images(self, index=None) -> torch.Tensor:
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)


# --- caching ---------------------------------------------------------------------------------
# Bump when the decoding rules change, so that no entry decoded under older rules is served.
_DECODE_VERSION = 2
# Files changed this close (ns) before a cache entry's listing was taken may change again without
# their (size, mtime_ns, ctime_ns) changing (coarse file-system clocks): their bytes are hashed instead.
_RACY_NS = 3_000_000_000


def cache_dir() -> Path:
    """Folder of the decode cache: ``$BAGCERT_CACHE``, default ``~/.cache/bagcert``."""
    return Path(os.environ.get("BAGCERT_CACHE") or Path.home() / ".cache" / "bagcert")


def cache_enabled(cache: bool = True) -> bool:
    """Whether the decode cache is used: ``cache`` (the loaders' parameter) and not ``BAGCERT_NO_CACHE=1``.

    ``BAGCERT_NO_CACHE`` accepts 1/true/yes (bypass: nothing is read from or written to the cache) and
    0/false/no or empty (use it); any other value is a :class:`DatasetError`.
    """
    value = os.environ.get("BAGCERT_NO_CACHE", "").strip().lower()
    if value in ("1", "true", "yes"):
        return False
    if value not in ("", "0", "false", "no"):
        raise DatasetError(f"BAGCERT_NO_CACHE must be 1 (bypass the dataset cache) or 0, got {os.environ['BAGCERT_NO_CACHE']!r}")
    return bool(cache)


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class _Listing:
    """An image folder as listed with ``os.scandir`` and ``stat`` only (no file is opened)."""

    root: Path
    classes: list
    sources: list  # paths relative to root, POSIX form
    labels: list
    stats: list  # (size, mtime_ns, ctime_ns) per file
    listed_ns: int
    ignored: int  # non-image files in the class folders

    def fingerprint(self, *params) -> str:
        return _digest(_DECODE_VERSION, *params, self.classes,
                       *(f"{s}\0{y}\0{a}\0{b}\0{c}" for s, y, (a, b, c) in zip(self.sources, self.labels, self.stats)))

    def racy(self) -> list:
        """Positions of the files changed too recently for their stat to vouch for their bytes."""
        edge = self.listed_ns - _RACY_NS
        return [k for k, (_, m, c) in enumerate(self.stats) if m >= edge or c >= edge]


def _list_image_folder(root: Path) -> _Listing:
    """Class folders (sorted, hidden ones skipped) and their image files (sorted by name)."""
    listed_ns = time.time_ns()
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DatasetError(f"cannot list {root}: {e.strerror or e}") from None
    sources, labels, stats, ignored = [], [], [], 0
    for i, c in enumerate(classes):
        try:
            with os.scandir(root / c) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DatasetError(f"cannot list the class folder {root / c}: {e.strerror or e}") from None
        for e in entries:
            if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                ignored += not e.is_dir()
                continue
            try:
                st = e.stat()  # follows symlinks: a loop or a dangling link fails here
            except OSError as err:
                raise DatasetError(f"{root / c / e.name}: cannot read the image file ({err.strerror or err})") from None
            if not stat.S_ISREG(st.st_mode):
                raise DatasetError(f"{root / c / e.name} has an image file name but is not a regular file")
            sources.append(f"{c}/{e.name}")
            labels.append(i)
            stats.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return _Listing(root, classes, sources, labels, stats, listed_ns, ignored)


def _entry_matches(obj, listing: _Listing, fp: str) -> bool:
    """A loaded cache entry belongs to this exact listing, and the recently changed files still hold
    the bytes that were decoded."""
    if not isinstance(obj, dict) or obj.get("fingerprint") != fp or obj.get("sources") != listing.sources:
        return False
    hashes = obj.get("hashes")
    if not isinstance(hashes, list) or len(hashes) != len(listing.sources) or not isinstance(obj.get("images"), torch.Tensor):
        return False
    if obj["images"].shape[0] != len(listing.sources) or obj["labels"].tolist() != listing.labels:
        return False
    for k in listing.racy():
        try:
            data = (listing.root / listing.sources[k]).read_bytes()
        except OSError:
            return False
        if _content_hash(data) != hashes[k]:
            return False
    return True


def _cached_folder(listing: _Listing, params: tuple, build, cache: bool):
    """``build()`` (a dict with images, labels, classes, sources, hashes), cached under a key made of
    the folder, ``params`` and every file's relative path, label, size, mtime_ns and ctime_ns.

    An entry is served only when that key matches and the files changed within ``_RACY_NS`` of its
    listing still hash to the bytes that were decoded; anything else (missing, stale, unreadable,
    half-written) is rebuilt. Entries are written atomically and older entries of the same folder and
    parameters are removed.
    """
    if not cache_enabled(cache):
        return build()
    from .checkpoint import CheckpointError, atomic_torch_save, safe_torch_load

    prefix = _digest("folder", _DECODE_VERSION, listing.root.resolve(), *params)[:16]
    fp = listing.fingerprint(*params)
    folder = cache_dir()
    path = folder / f"{prefix}-{fp[:24]}.pt"
    if path.is_file():
        try:
            obj = safe_torch_load(path, "dataset cache")
        except (CheckpointError, OSError):
            obj = None  # broken entry: rebuilt below
        if obj is not None and _entry_matches(obj, listing, fp):
            return obj
    obj = build()
    obj["fingerprint"] = fp
    try:
        atomic_torch_save(obj, path)
        for old in folder.glob(f"{prefix}-*.pt"):
            if old.name != path.name:
                old.unlink(missing_ok=True)
        for tmp in folder.glob(f".{prefix}-*.tmp"):  # left by a killed writer; never read
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"dataset cache {folder} is not writable ({e.strerror or e}); decoded without caching", stacklevel=3)
    return obj


# --- decoding ---------------------------------------------------------------------------------
def _bomb_message(name, e) -> str:
    return (f"{name} is too large to decode safely ({' '.join(str(e).split())}); bagcert applies Pillow's "
            "decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS pixels) to every image on every path")


def image_header_size(data: bytes, name="image") -> tuple[int, int]:
    """``(width, height)`` of an image file's bytes, read from its header only (nothing is decoded), under the
    decompression-bomb limit that :func:`decode_image` applies: Pillow's, ``2 x PIL.Image.MAX_IMAGE_PIXELS``
    pixels (178,956,970 by default; Pillow warns from 1 x). The stream path calls it before handing a JPEG to
    libjpeg-turbo (:func:`bagcert.streaming.decode_rgb`), so one limit holds on every path.

    Raises :class:`DatasetError` naming the file for an image over the limit or bytes that are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise DatasetError(_bomb_message(name, e)) from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ... for bad bytes
        why = "not a known image format, or not an image at all" if isinstance(e, UnidentifiedImageError) else \
            f"{type(e).__name__}: {str(e)[:200]}"
        raise DatasetError(f"{name} cannot be decoded as an image ({why})") from None


def check_upscale(width: int, height: int, target: int | None, name="image") -> None:
    """Refuse an image that reaching ``target`` pixels (the shorter side after resizing) would enlarge more than
    :data:`MAX_UPSCALE` times: its shorter side must be at least ``ceil(target / MAX_UPSCALE)`` pixels (10 px for a
    146 px resize, 16 px for 256). Raises :class:`DatasetError` naming the file; ``target=None`` checks nothing."""
    if target is None:
        return
    short = min(int(width), int(height))
    need = -(-int(target) // MAX_UPSCALE)
    if short < need:
        raise DatasetError(f"{name} is {width}x{height}: too small to enlarge to {target} px (more than {MAX_UPSCALE}x); "
                           f"images whose shorter side is below {need} px are refused (bagcert.data.MAX_UPSCALE)")


def decode_image(data: bytes, name="image", size: int | None = None, resize: int | None = None) -> np.ndarray:
    """Decode the bytes of one image file to uint8 [H, W, 3] under the module's decoding rules.

    Args:
        data: the file's bytes. name: how errors name the file.
        resize: if given, the shorter side is resized to it first. size: if given, the centre
            ``size`` x ``size`` crop is kept (needs ``resize >= size`` or an image at least that large).

    Raises:
        DatasetError: empty, truncated or undecodable bytes, an unsupported pixel mode, an image over the
            decompression-bomb limit (:func:`image_header_size`), an image smaller than ``size`` without a
            ``resize``, or one that ``resize`` would enlarge more than :data:`MAX_UPSCALE` times (:func:`check_upscale`).
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    if not data:
        raise DatasetError(f"{name} is empty (0 bytes): not an image")
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey-filled
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "PNG":
                with Image.open(io.BytesIO(data)) as check:
                    check.verify()  # chunk CRCs and the closing IEND chunk
            im = _to_rgb(im, name)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(_bomb_message(name, e)) from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ... for bad bytes
        if isinstance(e, UnidentifiedImageError):  # Pillow names its in-memory buffer, not the file: say what it means
            why = "not a known image format, or not an image at all"
        else:
            why = f"{type(e).__name__}: {str(e)[:200]}"
        raise DatasetError(f"{name} cannot be decoded as an image ({why})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    if resize is not None:
        w, h = im.size
        check_upscale(w, h, resize, name)
        s = resize / min(w, h)
        im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
    if size is not None:
        w, h = im.size
        if w < size or h < size:
            raise DatasetError(f"{name} is {w}x{h}, smaller than the crop {size}; give a resize >= {size}")
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def _to_rgb(im, name):
    """Pillow image of any mode -> RGB under the documented rules (alpha dropped, 16 bit -> high byte)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        v = np.asarray(im).astype(np.uint16)  # native byte order whatever the raw mode
        return Image.fromarray((v >> 8).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        raise DatasetError(f"{name} has pixel mode {mode} ({'32-bit integer' if mode == 'I' else 'floating point'} samples), "
                           "which has no defined 8-bit mapping; convert it to 8- or 16-bit RGB or grayscale")
    if mode == "LAB":
        raise DatasetError(f"{name} has pixel mode LAB; convert it to RGB")
    if mode in ("P", "PA"):  # palette colours; any transparency is dropped like an alpha channel
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _decode_folder(listing: _Listing, size=None, resize=None) -> dict:
    """Decode every file of ``listing`` into uint8 [N, 3, h, w] (plus labels, classes, sources, content hashes)."""
    root = listing.root
    if not listing.sources:
        raise DatasetError(f"no images found under {root}; expected ImageFolder layout {root}/<class>/<image>.jpg")
    out, hashes = None, []
    for k, rel in enumerate(listing.sources):
        f = root / rel
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DatasetError(f"{f}: cannot read the image file ({e.strerror or e})") from None
        hashes.append(_content_hash(data))
        arr = decode_image(data, f, size=size, resize=resize)
        if out is None:
            out = np.empty((len(listing.sources),) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DatasetError(
                f"{f} has size {arr.shape[1]}x{arr.shape[0]} but earlier images are {out.shape[2]}x{out.shape[1]}; "
                "give resize/crop sizes to load images of mixed sizes"
            )
        out[k] = arr
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "labels": torch.tensor(listing.labels, dtype=torch.long), "classes": list(listing.classes),
            "sources": list(listing.sources), "hashes": hashes}


def _load_folder(root: Path, params: tuple, size, resize, cache: bool):
    listing = _list_image_folder(root)
    obj = _cached_folder(listing, params, lambda: _decode_folder(listing, size=size, resize=resize), cache)
    return obj, listing


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


def _split_folders(root: Path) -> list:
    """The split folders of ``<root>/<split>/<class>/<image>`` (sorted), or [] when ``root`` is not laid out so.

    ``root`` has split folders when every visible sub-folder holds sub-folders and no image file."""
    try:
        with os.scandir(root) as it:
            children = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []
    if not children:
        return []
    for c in children:
        has_dir = False
        try:
            with os.scandir(root / c) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        has_dir = True
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                        return []
        except OSError:
            return []  # unreadable: the loader that lists it says so
        if not has_dir:
            return []
    return children


def _missing_split(root: Path, split: str, splits: list) -> DatasetError:
    return DatasetError(f"{root} has no split folder {split!r}; its split folders are: {', '.join(splits)}")


def _check_split_folder(spec, root: Path, split: str, splits: list) -> None:
    """A split a dataset with split folders ``splits`` has; ``"all"`` or a missing one is a :class:`DatasetError`."""
    if split not in splits:
        if split == "all":
            raise DatasetError(f"{spec} has split folders ({', '.join(splits)}): name one of them, not 'all'")
        raise _missing_split(root, split, splits)


def _check_unsplit_name(split: str) -> None:
    """The split names of a folder without split folders: test, train (seeded parts) or all."""
    if split not in ("test", "train", "all"):
        raise DatasetError(f"split must be {SPLIT_NAMES_HINT} for a folder without split folders, got {split!r}")


def _no_split_record(spec, split: str) -> DatasetError:
    return DatasetError(
        f"{spec} has no split folders and the checkpoint records no seeded split, so its {split} images cannot be "
        "told from the images it was trained on; retrain (train.py records its split in the checkpoint) or export "
        "the checkpoint with a split record, or ask for split 'all' to use every image knowingly"
    )


def load_cifar10(root, split: str = "test", cache: bool = True) -> Dataset:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` layout or from ``<root>/<split>/<class>/*.jpg``.

    Returns uint8 [N, 3, 32, 32] images; ``cache=False`` (or ``BAGCERT_NO_CACHE=1``) decodes image
    folders without the decode cache. Raises :class:`DatasetError` for a missing folder or split, another
    layout, images that are not 32x32, or an unusable image file (named).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"CIFAR-10 has the splits 'train' and 'test', got {split!r}")
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
        sources = [f"{n}:{r}" for n, p in zip(names, parts) for r in range(len(p[1]))]
        return Dataset(images, labels, list(CIFAR10_CLASSES), "CIFAR-10",
                       {"root": str(batches), "split": split, "layout": "cifar-10-batches-py"}, sources)
    folder = root / split
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        splits = _split_folders(root)
        if splits:
            raise _missing_split(root, split, splits)
        raise DatasetError(
            f"{root} has neither torchvision's CIFAR-10 layout (cifar-10-batches-py/data_batch_1..5, test_batch) "
            f"nor an image folder {folder}/<class>/<image>; expected one of those layouts"
        )
    obj, listing = _load_folder(folder, ("cifar-folder",), None, None, cache)
    images, labels, classes = obj["images"], obj["labels"], obj["classes"]
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise DatasetError(f"{folder} holds {tuple(images.shape[2:])} images; CIFAR-10 images are 32x32")
    jpeg = all(s.lower().endswith((".jpg", ".jpeg")) for s in listing.sources)
    name = CIFAR10_JPEG_NAME if jpeg else "CIFAR-10 (image folders)"
    return Dataset(images, labels, list(classes), name,
                   {"root": str(folder), "split": split, "layout": "image-folder", "ignored_files": listing.ignored},
                   list(listing.sources))


def resolve_image_folder(root, split: str | None = None) -> Path:
    """The class-folder root of an ImageFolder: ``<root>/<split>`` with ``split``, else ``root``.

    Raises :class:`DatasetError` for a missing split (naming the ones that exist), a missing folder, a folder
    without class sub-folders, or one holding split folders when no ``split`` was named.
    """
    root = Path(root)
    if split is not None:
        if not (root / split).is_dir():
            splits = _split_folders(root) if root.is_dir() else []
            if splits:
                raise _missing_split(root, split, splits)
        root = root / split
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}; expected ImageFolder layout <root>/<class>/<image>.jpg")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DatasetError(f"{root} has no class sub-folders; expected ImageFolder layout <root>/<class>/<image>.jpg")
    if split is None:
        splits = _split_folders(root)
        if splits:
            raise DatasetError(f"{root} has split folders ({', '.join(splits)}), not class folders: name the split to load")
    return root


def load_image_folder(root, size: int = 224, resize: int | None = None, split: str | None = None, cache: bool = True) -> Dataset:
    """ImageNet-style ImageFolder: ``<root>/<class>/<image>`` (or ``<root>/<split>/<class>/<image>``).

    Each image's shorter side is resized to ``resize`` (default ``round(size * 256 / 224)``) and the
    centre ``size`` x ``size`` crop kept: uint8 [N, 3, size, size], labels in sorted class-folder order.
    ``cache=False`` (or ``BAGCERT_NO_CACHE=1``) decodes without the decode cache.

    Raises :class:`DatasetError` for a missing folder or split, a folder without class folders (or with
    split folders and no ``split``), no images, or an unusable image file (named); ValueError for
    ``resize < size``.
    """
    root = resolve_image_folder(root, split)
    resize = resize if resize is not None else round(size * 256 / 224)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= the crop size ({size})")
    obj, listing = _load_folder(root, ("imagenet-folder", size, resize), size, resize, cache)
    info = {"root": str(root), "size": size, "resize": resize, "layout": "image-folder", "ignored_files": listing.ignored,
            **({"split": split} if split else {})}
    return Dataset(obj["images"], obj["labels"], list(obj["classes"]), root.name, info, list(listing.sources))


def synthetic_dataset(n: int = 64, num_classes: int = 10, size: int = 32, seed: int = 0) -> Dataset:
    """Random uint8 images [n, 3, size, size] with class-dependent colour shifts (learnable, for tests and smoke runs).

    The class colours are the same for every seed, so a train set and a test set drawn with
    different seeds come from one distribution. Raises ValueError for n, num_classes or size < 1.
    """
    for what, v in (("n", n), ("num_classes", num_classes), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"synthetic_dataset: {what} must be an int >= 1, got {v!r}")
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


def stratified_subset(data: Dataset, n: int, seed: int) -> Dataset:
    """A seeded, class-stratified subset of ``n`` images of ``data`` (positions sorted, provenance kept).

    Every class present gets ``n // K`` images (``K`` classes present); a class with fewer images gives
    all it has and the rest is shared among the others; the remaining ``n mod K`` go one each to classes
    drawn in a seeded order. Within a class the images are a seeded random draw. The same ``(data, n,
    seed)`` always gives the same subset. ``n >= len(data)`` returns ``data`` itself. The counts drawn
    are in ``info["stratified_subset"]`` (``{"n", "seed", "per_class": {class name: count}}``).

    Raises ValueError if ``n`` is not an int >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the subset size must be an int >= 1, got {n!r}")
    if n >= len(data):
        return data
    g = torch.Generator().manual_seed(int(seed))
    present = torch.unique(data.labels).tolist()
    members = {c: (data.labels == c).nonzero().flatten() for c in present}
    order = [present[i] for i in torch.randperm(len(present), generator=g).tolist()]
    alloc = {c: 0 for c in present}
    active, left = list(order), int(n)
    while active and left >= len(active):
        share = left // len(active)
        for c in active:
            take = min(share, len(members[c]) - alloc[c])
            alloc[c] += take
            left -= take
        active = [c for c in active if alloc[c] < len(members[c])]
    for c in active[:left]:  # fewer left than classes with room: one each, in the seeded class order
        alloc[c] += 1
    picks = []
    for c in present:
        m = members[c]
        picks.append(m[torch.randperm(len(m), generator=g)[: alloc[c]]])
    index = torch.cat(picks).sort().values
    out = data.subset(index)
    names = data.classes
    out.info["stratified_subset"] = {
        "n": int(n), "seed": int(seed),
        "per_class": {(names[c] if c < len(names) else str(c)): alloc[c] for c in present},
    }
    return out


def _synthetic_size(spec: str) -> int:
    if ":" not in spec:
        return 256
    text = spec.split(":", 1)[1]
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise DatasetError(f"dataset {spec!r}: the number of synthetic images must be an integer >= 1 (synthetic:N), got {text!r}")
    return n


def _is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def _spec_root(spec: str) -> Path:
    return Path(spec.split(":", 1)[1] if spec.split(":", 1)[0] in ("cifar10", "folder") else spec)


def load_dataset(spec: str, split: str = "test", size: int | None = None, resize: int | None = None, seed: int = 0,
                 num_classes: int = 10, cache: bool = True) -> Dataset:
    """Resolve a dataset spec: ``synthetic[:N]``, ``cifar10:<root>`` or ``folder:<root>``; a bare path is
    CIFAR-10 if it holds a CIFAR layout, otherwise an ImageNet-style folder (``<root>/<split>/<class>/...``
    when it has split folders, else ``<root>/<class>/...`` whatever ``split`` says).

    ``cache=False`` (or ``BAGCERT_NO_CACHE=1``) decodes without the decode cache. Raises
    :class:`DatasetError` for a bad synthetic size, a split folder that does not exist (naming the ones
    that do) and everything :func:`load_cifar10` / :func:`load_image_folder` refuse.
    """
    if _is_synthetic(spec):
        return synthetic_dataset(_synthetic_size(spec), num_classes, size or 32, seed + (0 if split == "train" else 1))
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("cifar10", "folder") else ("", "", spec)
    root = Path(path)
    if kind == "cifar10" or (not kind and (_find_cifar_batches(root) or _is_cifar_folder(root, split))):
        return load_cifar10(root, split, cache=cache)
    splits = _split_folders(root)
    if splits:
        if split not in splits:
            raise _missing_split(root, split, splits)
        return load_image_folder(root, size or 224, resize, split=split, cache=cache)
    return load_image_folder(root, size or 224, resize, cache=cache)


def load_checkpoint_split(spec: str, split: str, split_record: dict | None, size: int | None = None, resize: int | None = None,
                          seed: int = 0, num_classes: int = 10, cache: bool = True) -> Dataset:
    """Load ``split`` of a dataset the way a checkpoint saw it.

    A dataset with split folders (CIFAR-10, ``<root>/<split>/<class>/...``) is returned as stored; a
    split it does not have is a :class:`DatasetError` naming the ones it has, and so is ``"all"``. A
    folder without split folders was cut at training time with a seeded split, recorded in the
    checkpoint's metadata as ``split_record`` (``{"seed", "test_fraction", "num_images"}``, see
    ``bagcert.training.dataset_metadata``): ``split="test"`` or ``"train"`` then returns that part, so
    that a model is never evaluated on the images it was trained on, and ``"all"`` every image. A
    folder whose image count differs from the record is not the training folder: its ``"test"`` /
    ``"train"`` parts do not exist and asking for them is a :class:`DatasetError` (ask for ``"all"``).
    Without a record (a model trained elsewhere) the test images of such a folder cannot be told from
    its training images: ``"test"`` / ``"train"`` are a :class:`DatasetError` and only ``"all"`` loads it.
    ``info["split"]`` says which part was returned; ``indices`` point into the whole folder.
    """
    if _is_synthetic(spec):
        data = load_dataset(spec, "test" if split == "all" else split, size=size, resize=resize, seed=seed, num_classes=num_classes)
        if split == "all":
            data.info["split"] = "all"
        return data
    root = _spec_root(spec)
    if _find_cifar_batches(root) is not None:
        splits = ["test", "train"]
    else:
        splits = _split_folders(root) if root.is_dir() else []
    if splits:
        _check_split_folder(spec, root, split, splits)
        return load_dataset(spec, split, size=size, resize=resize, seed=seed, num_classes=num_classes, cache=cache)
    data = load_dataset(spec, "test" if split == "all" else split, size=size, resize=resize, seed=seed,
                        num_classes=num_classes, cache=cache)
    if data.info.get("layout") != "image-folder":  # not a folder on disk (a loader that returns other data): as loaded
        if split == "all":
            if data.info.get("split") is not None:
                raise DatasetError(f"{spec} has splits ({data.info['split']!r} ...): name one of them, not 'all'")
            data.info["split"] = "all"
        return data
    _check_unsplit_name(split)
    if split == "all":
        data.info["split"] = "all"
        return data
    if not split_record:
        raise _no_split_record(spec, split)
    return cut_seeded_split(data, split, split_record, spec)


def cut_seeded_split(data: Dataset, split: str, split_record: dict, name: str = "the folder") -> Dataset:
    """The ``split`` part (``"test"`` or ``"train"``) of a whole folder ``data``, cut with a checkpoint's
    seeded split record (see :func:`load_checkpoint_split`); a folder of another size is a :class:`DatasetError`.
    The part keeps ``sources`` and its ``indices`` into the whole folder."""
    if split not in ("test", "train"):
        raise DatasetError(f"split must be {SPLIT_NAMES_HINT} for a folder without split folders, got {split!r}")
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
    cropping = pad > 0 or (crop is not None and (crop, crop) != (H, W))
    fast = cropping and x.device.type == "cpu"  # flip and crop per image (_shifted_crops): the same pixels, faster
    if flip:
        f = (torch.rand(n, generator=generator) < 0.5)[sel]
        if not fast:
            x = torch.where(f.view(B, 1, 1, 1).to(x.device), x.flip(3), x)
    if cropping:
        Ho, Wo = (H, W) if crop is None else (crop, crop)
        dy = torch.randint(0, H + 2 * pad - Ho + 1, (n,), generator=generator)[sel].to(x.device)
        dx = torch.randint(0, W + 2 * pad - Wo + 1, (n,), generator=generator)[sel].to(x.device)
        if fast:
            flips = f.tolist() if flip else None
            return _cutout(_shifted_crops(x, dy.tolist(), dx.tolist(), pad, Ho, Wo, flips), generator, cutout, n, sel)
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
        H, W = Ho, Wo
        r = dy.view(B, 1) + torch.arange(H, device=x.device).view(1, H)  # [B, H]
        c = dx.view(B, 1) + torch.arange(W, device=x.device).view(1, W)  # [B, W]
        bidx = torch.arange(B, device=x.device).view(B, 1, 1)
        x = xp.permute(0, 2, 3, 1)[bidx, r.view(B, H, 1), c.view(B, 1, W)].permute(0, 3, 1, 2)
    return _cutout(x, generator, cutout, n, sel)


def _cutout(x: torch.Tensor, generator: torch.Generator, cutout: int, n: int, sel: torch.Tensor) -> torch.Tensor:
    """:func:`augment_batch`'s last stage: cutout squares (drawn for the global batch of ``n``), contiguous result."""
    B, _, H, W = x.shape
    if cutout > 0:
        cy = torch.randint(0, H, (n,), generator=generator)[sel].to(x.device)
        cx = torch.randint(0, W, (n,), generator=generator)[sel].to(x.device)
        r = torch.arange(H, device=x.device).view(1, H, 1)
        c = torch.arange(W, device=x.device).view(1, 1, W)
        half = cutout // 2
        m = ((r - cy.view(B, 1, 1)).abs() <= half) & ((c - cx.view(B, 1, 1)).abs() <= half)
        x = x.masked_fill(m.unsqueeze(1), 0)
    return x.contiguous()


def _shifted_crops(x: torch.Tensor, dy: list, dx: list, pad: int, Ho: int, Wo: int, flips: list | None = None) -> torch.Tensor:
    """Image i's ``Ho`` x ``Wo`` window at (dy[i], dx[i]) of ``x`` (flipped left-right first where ``flips[i]``)
    zero-padded by ``pad``: [B, C, Ho, Wo].

    Equal to flipping the whole batch and indexing the padded batch (the generic path of :func:`augment_batch`,
    tested), but without materialising flipped and padded batches or gathering pixel by pixel: one block copy of
    the window's part inside the image per image.
    """
    B, C, H, W = x.shape
    out = x.new_zeros((B, C, Ho, Wo))
    for i in range(B):
        src = x[i].flip(-1) if flips is not None and flips[i] else x[i]
        oy, ox = dy[i] - pad, dx[i] - pad  # window origin in unpadded coordinates
        r0, r1 = max(0, -oy), min(Ho, H - oy)
        c0, c1 = max(0, -ox), min(Wo, W - ox)
        if r0 < r1 and c0 < c1:
            out[i, :, r0:r1, c0:c1] = src[:, r0 + oy : r1 + oy, c0 + ox : c1 + ox]
    return out
