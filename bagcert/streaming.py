"""Streaming datasets: images decoded per batch by DataLoader workers instead of held in memory.

The in-memory path (:mod:`bagcert.data`) decodes a whole dataset into one uint8 tensor before the first
step: the fast path for CIFAR-10 or Imagenette, impossible for ImageNet at 224 px (1.28 M x 3 x 224 x 224
bytes, about 193 GB). This module reads the same layouts one image at a time:

* :class:`ImageFolderStream`: ``<root>/<class>/<image>`` or ``<root>/<split>/<class>/<image>``, classes
  and files in the order of :func:`bagcert.data.load_image_folder` (sorted names). The evaluation view
  goes through the in-memory path's decoder, shorter-side resize (Pillow bilinear) and centre crop, so
  its pixels are identical to :mod:`bagcert.data`'s; the training view decodes JPEG files with
  ``torchvision.io.decode_image`` (RGB) and augments with ``torchvision.transforms.v2``.
* :class:`TensorStream`: any in-memory :class:`bagcert.data.Dataset` (torchvision's
  ``cifar-10-batches-py``, synthetic) behind the same interface.
* :func:`make_loader`: a ``DataLoader`` over one process's shard of an epoch, a pure function of
  ``(seed, epoch, rank, world)``, that can start at any batch of the epoch (resume), with per-sample
  augmentation seeded by ``(seed, epoch, index)``.
* :func:`choose_data_path`: the in-memory path while the decoded set fits a memory budget, else streaming.

Every item is a uint8 image [3, S, S] (pixel values 0..255, RGB): models take float images in [0, 1]
and normalise inside, so a consumer divides by 255 after moving a batch to its device, as the in-memory
training loop does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import (
    CIFAR10_JPEG_NAME,
    Dataset,
    DatasetError,
    _find_cifar_batches,
    _is_cifar_folder,
    _is_synthetic,
    _list_image_folder,
    _missing_split,
    _split_folders,
    _synthetic_size,
    check_upscale,
    image_header_size,
    load_cifar10,
    resolve_image_folder,
    synthetic_dataset,
)
from .data import decode_image as _pil_decode

__all__ = [
    "StreamDataset",
    "ImageFolderStream",
    "TensorStream",
    "SubsetStream",
    "open_stream",
    "decode_eval",
    "decode_rgb",
    "ShardedBatchSampler",
    "make_loader",
    "epoch_order",
    "sample_seed",
    "decoded_size_bytes",
    "SkipBadImages",
    "skipped_images",
    "available_memory_bytes",
    "max_loader_workers",
    "LOADER_WORKER_BYTES",
    "choose_data_path",
    "DEFAULT_MEMORY_FRACTION",
    "AUGMENTATIONS",
]

AUGMENTATIONS = ("auto", "resized-crop", "pad-crop", "none")
DEFAULT_MEMORY_FRACTION = 0.25
#: Memory set aside per DataLoader worker process by :func:`max_loader_workers`: a forked worker's private pages
#: (the copy-on-write pages it touches), its decode buffers and its prefetched batches (2 x 256 ImageNet crops are
#: 77 MB), with room to spare.
LOADER_WORKER_BYTES = 512 * 2**20


def _mix(*parts) -> int:
    """A 62-bit seed from integers (the mixing of ``bagcert.training``'s seeded generators)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return s


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset item ``index``'s augmentation in ``epoch``: a pure function of the three, so a
    sample is augmented identically whichever rank, batch position or worker process draws it."""
    return _mix(seed, epoch, index, 13)


# --- datasets ---------------------------------------------------------------------------------
class StreamDataset(torch.utils.data.Dataset):
    """Base of the streaming datasets.

    Attributes: ``classes`` (list of class names, label ``i`` is ``classes[i]``), ``labels`` (int64 [N]),
    ``name``, ``info`` (provenance, as :class:`bagcert.data.Dataset`), ``image_shape`` (``(3, H, W)`` of
    every item), ``augment`` (the training augmentation, one of :data:`AUGMENTATIONS`).

    ``ds[i]`` is ``(image, label)``: the evaluation view of item ``i``, uint8 [3, H, W] and an int.
    ``ds.train_item(i, seed)`` is the training view, augmented with randomness drawn only from ``seed``.
    Decoding errors raise :class:`bagcert.data.DatasetError` naming the file.
    """

    classes: list
    labels: torch.Tensor
    name: str
    info: dict
    image_shape: tuple
    augment: str

    def __len__(self) -> int:
        return int(self.labels.numel())

    def _check_index(self, i) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        return i % n

    def eval_image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Item ``i`` augmented with torch's global CPU generator (callers seed it, see :meth:`train_item`)."""
        raise NotImplementedError

    def __getitem__(self, i):
        i = self._check_index(i)
        return self.eval_image(i), int(self.labels[i])

    def train_item(self, i: int, seed: int):
        """``(image uint8 [3, H, W], label)`` of item ``i`` augmented with randomness drawn from ``seed`` only.

        torch's global CPU generator is seeded for the draw and restored afterwards, so the caller's random
        stream is untouched (and CUDA generators are never seeded).
        """
        i = self._check_index(i)
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(int(seed))
            x = self.train_image(i)
        finally:
            torch.set_rng_state(state)
        return x, int(self.labels[i])

    @property
    def decoded_bytes(self) -> int:
        """Bytes the in-memory path would hold for this set: N * 3 * H * W (uint8)."""
        c, h, w = self.image_shape
        return len(self) * c * h * w

    def subset(self, index) -> "SubsetStream":
        """The items ``index`` (int64 [K] or a list), in that order, with this dataset's transforms."""
        return SubsetStream(self, index)


def _train_transform(augment: str, out_hw: tuple, pad: int = 4):
    """The torchvision v2 pipeline of ``augment`` producing uint8 [3, *out_hw]; None for ``"none"``."""
    from torchvision.transforms import v2

    if augment == "resized-crop":
        return v2.Compose([v2.RandomResizedCrop(list(out_hw), antialias=True), v2.RandomHorizontalFlip()])
    if augment == "pad-crop":
        return v2.Compose([v2.RandomCrop(list(out_hw), padding=pad, fill=0), v2.RandomHorizontalFlip()])
    return None


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")


def _clean_error(e: Exception) -> str:
    """torchvision's C++ messages start with the source location: keep what follows it."""
    return re.sub(r"^.*?\.cpp:\d+,\s*", "", str(e)).strip()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the image file ({e.strerror or e})") from None


def decode_eval(path, size: int | None = None, resize: int | None = None) -> torch.Tensor:
    """The evaluation view of one image file: uint8 [3, h, w], or [3, size, size] with ``size``.

    The bytes go through :func:`bagcert.data.decode_image`, the in-memory path's decoder, so pixels,
    colour conversions (grayscale copied, alpha dropped, 16 bit to its high byte), the shorter-side
    ``resize`` (Pillow bilinear) and the centre crop are exactly those of :mod:`bagcert.data`, and so are
    the refusals. Raises :class:`bagcert.data.DatasetError` naming the file when it cannot be read or
    decoded, or is smaller than ``size`` without a ``resize``.
    """
    path = Path(path)
    arr = _pil_decode(_read_bytes(path), path, size=size, resize=resize)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # one copy: writable, contiguous CHW


def decode_rgb(path) -> torch.Tensor:
    """Decode the image file ``path`` at its stored size to uint8 [3, H, W] RGB (the training view's input).

    JPEG files (recognised by their first bytes, whatever the extension) are decoded by
    ``torchvision.io.decode_image`` in RGB mode (libjpeg-turbo straight into a tensor: the same pixels as
    Pillow, grayscale and CMYK included, and faster); any other format by :func:`bagcert.data.decode_image`
    under the in-memory path's rules. Raises :class:`bagcert.data.DatasetError` naming the file when it
    cannot be read or decoded (a truncated JPEG included).
    """
    path = Path(path)
    data = _read_bytes(path)
    if data[:3] == b"\xff\xd8\xff":
        from torchvision.io import ImageReadMode, decode_image

        image_header_size(data, path)  # the decompression-bomb limit of the Pillow path, before libjpeg allocates
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise DatasetError(f"{path} cannot be decoded as an image ({_clean_error(e)[:200]})") from None
    return torch.from_numpy(_pil_decode(data, path).transpose(2, 0, 1).copy())


class ImageFolderStream(StreamDataset):
    """An ImageFolder read one image at a time: ``<root>/<class>/<image>`` or, with ``split``,
    ``<root>/<split>/<class>/<image>``.

    The listing is the in-memory loader's (:func:`bagcert.data._list_image_folder`: class folders
    sorted, hidden ones skipped, image files sorted by name), so label ``i`` and item ``k`` are those of
    :func:`bagcert.data.load_image_folder`, and the folder checks are the same.

    ``size``: side of the square crop; ``resize``: the shorter side before cropping (default
    ``round(size * 256 / 224)``, as the in-memory path). ``size=None`` keeps every image at its stored
    size, which must then be the same for all (CIFAR-10 as JPEG folders): the first image fixes it and an
    image of another size raises :class:`DatasetError` when it is read.

    Evaluation view ``ds[i]``: uint8 [3, size, size], equal to ``load_image_folder(...).images[i]``
    (:func:`decode_eval`). Training view (``augment``): ``"resized-crop"`` is torchvision's
    RandomResizedCrop(size) of the whole image at its stored size (:func:`decode_rgb`; scale 0.08-1,
    aspect 3/4-4/3, bilinear with antialias) and a horizontal flip; ``"pad-crop"`` the evaluation view
    zero-padded by 4 and randomly cropped back, and a flip (CIFAR); ``"none"`` the evaluation view;
    ``"auto"`` picks resized-crop when ``size`` is given, else pad-crop.

    Raises :class:`DatasetError` for a missing folder or split (naming the split folders there are), no
    class folders, split folders without ``split``, or no images; ``ValueError`` for ``resize < size``
    or an unknown ``augment``. The file list is kept as one byte buffer (a few tens of bytes per image),
    so worker processes do not each touch a million Python objects.
    """

    def __init__(self, root, split: str | None = None, size: int | None = 224, resize: int | None = None, augment: str = "auto"):
        _check_augment(augment)
        root = resolve_image_folder(root, split)
        if size is not None:
            if int(size) < 1:
                raise ValueError(f"size must be a positive number of pixels, got {size}")
            resize = resize if resize is not None else round(size * 256 / 224)
            if resize < size:
                raise ValueError(f"resize ({resize}) must be >= the crop size ({size})")
        elif resize is not None:
            raise ValueError(f"resize ({resize}) needs a crop size: give size too, or neither to keep the stored size")
        listing = _list_image_folder(root)
        if not listing.sources:
            raise DatasetError(f"no images found under {root}; expected ImageFolder layout {root}/<class>/<image>.jpg")
        self.root = root
        self.size, self.resize = size, resize
        self.classes = list(listing.classes)
        self.labels = torch.tensor(listing.labels, dtype=torch.long)
        self.name = root.name
        self.augment = ("resized-crop" if size is not None else "pad-crop") if augment == "auto" else augment
        rel = [s.encode() for s in listing.sources]
        self._offsets = np.cumsum([0] + [len(r) for r in rel], dtype=np.int64)
        self._names = np.frombuffer(b"".join(rel), dtype=np.uint8).copy()
        self.image_shape = tuple(decode_eval(self.path(0)).shape) if size is None else (3, size, size)
        self.info = {"root": str(root), "layout": "image-folder", "streaming": True, "ignored_files": listing.ignored,
                     **({"size": size, "resize": resize} if size is not None else {}), **({"split": split} if split else {})}
        self._train = _train_transform(self.augment, self.image_shape[1:])

    def source(self, i: int) -> str:
        """Item ``i``'s path relative to the folder, POSIX form (``"cat/0001.jpg"``), as ``Dataset.sources``."""
        i = self._check_index(i)
        return self._names[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> Path:
        """The file of item ``i``."""
        return self.root / self.source(i)

    def eval_image(self, i: int) -> torch.Tensor:
        f = self.path(i)
        x = decode_eval(f, self.size, self.resize)
        if tuple(x.shape) != self.image_shape:
            raise DatasetError(
                f"{f} has size {x.shape[2]}x{x.shape[1]} but the folder's first image is {self.image_shape[2]}x{self.image_shape[1]}; "
                "give resize/crop sizes to read images of mixed sizes"
            )
        return x

    def train_image(self, i: int) -> torch.Tensor:
        if self.augment == "resized-crop":
            x = decode_rgb(self.path(i))
            check_upscale(x.shape[2], x.shape[1], self.size, self.path(i))  # the evaluation view's minimum, here too
            return self._train(x).contiguous()
        x = self.eval_image(i)
        return x if self._train is None else self._train(x).contiguous()


class TensorStream(StreamDataset):
    """An in-memory :class:`bagcert.data.Dataset` (uint8 [N, 3, H, W]) behind the streaming interface:
    torchvision's ``cifar-10-batches-py`` (150 MB for the training set) or a synthetic set.

    ``ds[i]`` is ``data.images[i]``; ``augment``: ``"pad-crop"`` (zero padding 4, random crop, flip; the
    default for ``"auto"``), ``"resized-crop"`` (RandomResizedCrop to the stored size, flip) or ``"none"``.
    """

    def __init__(self, data: Dataset, augment: str = "auto"):
        _check_augment(augment)
        if data.images.dtype != torch.uint8 or data.images.dim() != 4 or data.images.shape[1] != 3:
            raise TypeError(f"expected uint8 images [N, 3, H, W], got {data.images.dtype} {tuple(data.images.shape)}")
        self.data = data
        self.classes = list(data.classes)
        self.labels = data.labels.to(torch.long)
        self.name = data.name
        self.info = dict(data.info, streaming=True)
        self.image_shape = tuple(data.images.shape[1:])
        self.augment = "pad-crop" if augment == "auto" else augment
        self._train = _train_transform(self.augment, self.image_shape[1:])

    def eval_image(self, i: int) -> torch.Tensor:
        return self.data.images[i]

    def train_image(self, i: int) -> torch.Tensor:
        x = self.data.images[i]
        return x.clone() if self._train is None else self._train(x).contiguous()


class SubsetStream(StreamDataset):
    """Items ``index`` of a stream, in that order, with its transforms (e.g. a seeded test split)."""

    def __init__(self, base: StreamDataset, index):
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        n = len(base)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise IndexError(f"subset indices must lie in [0, {n - 1}], got {int(index.min())}..{int(index.max())}")
        self.base, self.index = base, index
        self.classes, self.name, self.image_shape, self.augment = base.classes, base.name, base.image_shape, base.augment
        self.labels = base.labels[index]
        self.info = dict(base.info, subset=int(index.numel()))

    def eval_image(self, i: int) -> torch.Tensor:
        return self.base.eval_image(int(self.index[i]))

    def train_image(self, i: int) -> torch.Tensor:
        return self.base.train_image(int(self.index[i]))


class SkipBadImages(StreamDataset):
    """The evaluation view of ``base`` where an image that cannot be read (a :class:`~bagcert.data.DatasetError`:
    undecodable, truncated, unreadable) is replaced by a black image and recorded, so that a long run keeps going.

    The record is one line per bad item, ``"<position>\\t<message>"``, appended to the file ``record`` (``O_APPEND``
    writes of one short line each, so DataLoader worker processes can share it); :func:`skipped_images` reads it
    back. The caller must drop the recorded positions from its results: their rows describe the black stand-in.
    Training views are not offered (a training run stops on a bad image and keeps its checkpoint instead).
    """

    def __init__(self, base: StreamDataset, record):
        self.base, self.record = base, str(record)
        self.classes, self.name, self.image_shape, self.augment = base.classes, base.name, base.image_shape, base.augment
        self.labels = base.labels
        self.info = dict(base.info)

    def eval_image(self, i: int) -> torch.Tensor:
        from .data import DatasetError

        try:
            return self.base.eval_image(i)
        except DatasetError as e:
            line = f"{int(i)}\t{' '.join(str(e).split())}\n".encode()
            fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            return torch.zeros(self.image_shape, dtype=torch.uint8)

    def train_image(self, i: int) -> torch.Tensor:
        raise TypeError("SkipBadImages offers the evaluation view only")


def skipped_images(record) -> dict:
    """``{position: message}`` of the items a :class:`SkipBadImages` replaced (each position once; {} without a record)."""
    try:
        text = Path(record).read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        pos, _, msg = line.partition("\t")
        if pos.strip().isdigit():
            out.setdefault(int(pos), msg)
    return dict(sorted(out.items()))


def open_stream(spec: str, split: str = "test", size: int | None = None, resize: int | None = None, seed: int = 0,
                num_classes: int = 10, augment: str = "auto") -> StreamDataset:
    """The streaming counterpart of :func:`bagcert.data.load_dataset`, resolving the same specs to the
    same images in the same order.

    ``synthetic[:N]`` and torchvision's ``cifar-10-batches-py`` are small and held in memory
    (:class:`TensorStream`); CIFAR-10 as image folders ``<root>/<split>/<class>/*`` is streamed at its
    stored 32x32 size; any other folder is an ImageNet-style :class:`ImageFolderStream`
    (``<root>/<split>/...`` when it has split folders, else ``<root>`` itself) with crop ``size``
    (default 224) and ``resize``. Raises :class:`DatasetError` as the in-memory loaders do.
    """
    if _is_synthetic(spec):
        return TensorStream(synthetic_dataset(_synthetic_size(spec), num_classes, size or 32, seed + (0 if split == "train" else 1)), augment)
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("cifar10", "folder") else ("", "", spec)
    root = Path(path)
    if kind == "cifar10" or (not kind and (_find_cifar_batches(root) or _is_cifar_folder(root, split))):
        if _find_cifar_batches(root) is not None or split not in ("train", "test") or not (root / split).is_dir():
            return TensorStream(load_cifar10(root, split), augment)  # the batch layout is small; else load_cifar10 says what is wrong
        ds = ImageFolderStream(root, split, size=None, augment=augment)
        if ds.image_shape != (3, 32, 32):
            raise DatasetError(f"{ds.root} holds {ds.image_shape[1:]} images; CIFAR-10 images are 32x32")
        jpeg = all(ds.source(i).lower().endswith((".jpg", ".jpeg")) for i in range(len(ds)))
        ds.name = CIFAR10_JPEG_NAME if jpeg else "CIFAR-10 (image folders)"
        return ds
    splits = _split_folders(root)
    if splits:
        if split not in splits:
            raise _missing_split(root, split, splits)
        return ImageFolderStream(root, split, size or 224, resize, augment)
    return ImageFolderStream(root, None, size or 224, resize, augment)


# --- sharding and loading ---------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The global order of an epoch, int64 [n]: ``torch.randperm(n)`` from a generator seeded by
    ``(seed, epoch)`` (the same permutation as the in-memory training loop's), or ``arange(n)``."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))


class ShardedBatchSampler:
    """One process's batches of one epoch, as lists of ``(index, epoch)`` pairs (a ``batch_sampler``).

    The epoch's global order (:func:`epoch_order`) is cut into global batches of ``batch_size``
    (the sum over all ``world`` processes, divisible by ``world``); process ``rank`` takes positions
    ``rank, rank + world, ...`` of each global batch. Concatenated, a rank's indices are
    ``order[rank::world]``, as torch's ``DistributedSampler`` gives (same padding rule, the permutation
    seeded by ``(seed, epoch)``), and the union of the ranks' batches ``k`` is global batch ``k``.

    Tail of the epoch, ``n`` images: with ``drop_last`` the incomplete last global batch is dropped
    (``n // batch_size`` batches, as the in-memory training loop). Otherwise, when shuffling, the order is
    padded to a multiple of ``world`` by repeating its first ``(-n) % world`` entries (DistributedSampler's
    rule), so every rank runs the same number of batches (DDP needs that) and those few images are seen
    twice; without shuffling (evaluation) nothing is padded, every index is seen exactly once, the
    ranks' last batches may differ in size by one and a rank left with nothing runs one batch fewer.

    ``start_batch``: the first batch to yield (the batches before it were done before a restart); the
    index list starts there, nothing is decoded for the skipped batches. :meth:`set_epoch` moves a
    persistent loader to another epoch (and start batch).

    Raises ``ValueError`` for a batch size not divisible by ``world``, a rank outside ``[0, world)`` or
    a ``start_batch`` beyond the epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = False, start_batch: int = 0):
        if n < 1:
            raise ValueError(f"the dataset is empty: need at least one image, got n={n}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank={rank}, world={world}")
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the number of processes {world} "
                             "(it is the global batch, split evenly over the processes)")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last with {n} images and a batch of {batch_size} leaves no batch: lower the batch size")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        """Number of global batches (every rank runs this many, the last one possibly smaller)."""
        if self.drop_last:
            return self.n // self.batch_size
        total = self.n + ((-self.n) % self.world if self.shuffle else 0)
        return -(-total // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Yield the batches of ``epoch`` from ``start_batch`` on at the next iteration."""
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch must lie in [0, {self.batches_per_epoch()}] (batches in an epoch), got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self) -> torch.Tensor:
        """The epoch's global order after padding or dropping the tail, int64."""
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        if self.drop_last:
            return order[: (self.n // self.batch_size) * self.batch_size]
        pad = (-self.n) % self.world if self.shuffle else 0
        return torch.cat([order, order[:pad]]) if pad else order

    def index_batches(self) -> list:
        """This rank's remaining batches as lists of dataset indices."""
        order = self.order()
        out = []
        for k in range(self.start_batch, self.batches_per_epoch()):
            b = order[k * self.batch_size : (k + 1) * self.batch_size][self.rank :: self.world].tolist()
            if b:  # unpadded evaluation: a rank may have nothing left in the last global batch
                out.append(b)
        return out

    def __iter__(self):
        e = self.epoch
        for b in self.index_batches():
            yield [(i, e) for i in b]

    def __len__(self) -> int:
        return len(self.index_batches())


class _LoaderView(torch.utils.data.Dataset):
    """What the workers index: ``(index, epoch)`` -> (image, label, index), training or evaluation view."""

    def __init__(self, dataset: StreamDataset, train: bool, seed: int):
        self.dataset, self.train, self.seed = dataset, train, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, epoch = key
        try:
            if self.train:
                x, y = self.dataset.train_item(i, sample_seed(self.seed, epoch, i))
            else:
                x, y = self.dataset[i]
        except DatasetError as e:
            # carried to the main process as data: raised there with its own one-line message, not wrapped in the
            # worker's traceback (DataLoader re-raises a worker's exception with the traceback as its message)
            return _Failed(str(e))
        return x, y, i


class _Failed:
    """A :class:`DatasetError` met while reading one item (in a loader worker or not): its message."""

    def __init__(self, message: str):
        self.message = message


class _Loader(DataLoader):
    """``DataLoader`` that raises an item's :class:`DatasetError` in the main process with the item's own message."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Failed):
                raise DatasetError(batch.message)
            yield batch


def _collate(items):
    failed = next((it for it in items if isinstance(it, _Failed)), None)
    if failed is not None:
        return failed
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items], dtype=torch.long)
    idx = torch.tensor([it[2] for it in items], dtype=torch.long)
    return x, y, idx


def make_loader(dataset: StreamDataset, batch_size: int, train: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1,
                start_batch: int = 0, workers: int = 0, pin_memory: bool | None = None, drop_last: bool = False,
                prefetch_factor: int | None = None) -> DataLoader:
    """A ``DataLoader`` over process ``rank``'s shard of ``epoch``, from global batch ``start_batch`` on.

    Each batch is ``(images, labels, indices)``: uint8 [b, 3, H, W], int64 [b], int64 [b] (the dataset
    indices), with ``b = batch_size // world`` (fewer in the last batch unless ``drop_last``). The
    shard is a pure function of ``(seed, epoch, rank, world)`` (see :class:`ShardedBatchSampler` for the
    order, the tail and the padding rule); ``train=True`` shuffles and augments each sample with
    randomness from ``(seed, epoch, index)`` only (:func:`sample_seed`), so a run resumed at batch ``k``
    yields the same batches ``k, k+1, ...`` as an uninterrupted epoch, with any number of workers.
    ``train=False`` keeps the dataset order and the evaluation view.

    ``workers``: DataLoader worker processes (0 decodes in this process); they persist across epochs:
    call ``loader.batch_sampler.set_epoch(e)`` instead of building a new loader. ``prefetch_factor``:
    batches each worker loads ahead (torch's default 2 when None). ``pin_memory`` defaults to whether
    CUDA is available. Raises ``ValueError`` as :class:`ShardedBatchSampler` does,
    or for ``workers < 0``. Iterating raises :class:`bagcert.data.DatasetError` with the bad file's one-line
    message when an image cannot be read (from a worker too: not wrapped in the worker's traceback).
    """
    if not isinstance(dataset, StreamDataset):
        raise TypeError(f"make_loader takes a bagcert.streaming dataset (ImageFolderStream, TensorStream, ...), got {type(dataset).__name__}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, epoch, rank, world, shuffle=train, drop_last=drop_last, start_batch=start_batch)
    kw = {}
    if workers > 0:
        kw = {"persistent_workers": True, **({"prefetch_factor": prefetch_factor} if prefetch_factor else {})}
    return _Loader(
        _LoaderView(dataset, train, seed),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(_mix(seed, epoch, 17)),  # the loader's own draws leave torch's global stream alone
        **kw,
    )


# --- choosing the path ------------------------------------------------------------------------
def decoded_size_bytes(n: int, size: int, channels: int = 3) -> int:
    """Bytes of ``n`` decoded uint8 images of ``size`` x ``size`` (``int`` or ``(h, w)``)."""
    h, w = (size, size) if isinstance(size, int) else size
    return int(n) * channels * int(h) * int(w)


def available_memory_bytes() -> int:
    """Memory available to new allocations, in bytes: ``MemAvailable`` of ``/proc/meminfo`` (free plus
    reclaimable page cache) where the file exists, else ``os.sysconf`` free pages times the page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def usable_cpus() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity`` where it exists: taskset and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_loader_workers(copies: int | None = None, explain: bool = False):
    """The most DataLoader worker processes one process should start on this machine:
    ``min(usable CPU cores // copies, available memory // (LOADER_WORKER_BYTES * copies))``, at least 1.

    ``copies``: processes on this machine that each start that many workers (default: torchrun's
    ``LOCAL_WORLD_SIZE``, else 1). Decoding is CPU work, so workers beyond the cores only add memory; each
    worker is a process of its own (:data:`LOADER_WORKER_BYTES` set aside). ``explain=True`` returns
    ``(limit, reason)`` with the numbers behind it, one line."""
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if copies is None else int(copies)
    copies = max(1, copies)
    cpus, avail = usable_cpus(), available_memory_bytes()
    by_cpu = cpus // copies
    by_mem = avail // (LOADER_WORKER_BYTES * copies)
    limit = max(1, min(by_cpu, by_mem))
    if not explain:
        return limit
    share = f" shared by {copies} processes" if copies > 1 else ""
    return limit, (f"{cpus} usable CPU cores and {_fmt(avail)} available memory at {_fmt(LOADER_WORKER_BYTES)} per loader "
                   f"process{share}")


def _fmt(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000


def choose_data_path(decoded_bytes: int, budget_bytes: int | None = None, override: str | None = None, copies: int = 1):
    """``("memory" | "stream", reason)``: hold the decoded set in memory while it fits the budget.

    ``decoded_bytes``: size of the decoded set (:func:`decoded_size_bytes`, ``N * 3 * size * size``);
    ``copies``: processes on this machine that would each hold it (e.g. torchrun's local world size);
    ``budget_bytes``: default :data:`DEFAULT_MEMORY_FRACTION` (25 %) of :func:`available_memory_bytes`.
    ``override``: ``"memory"`` or ``"stream"`` forces that path (the reason says so, and says when a forced
    memory path exceeds the budget); ``None`` or ``"auto"`` decides: memory when
    ``decoded_bytes * copies <= budget_bytes``. The reason is one line meant for the run's log.
    Raises ``ValueError`` for an unknown override or a negative size or budget.
    """
    if override not in (None, "auto", "memory", "stream"):
        raise ValueError(f"data path must be auto, memory or stream, got {override!r}")
    if decoded_bytes < 0 or copies < 1:
        raise ValueError(f"decoded_bytes must be >= 0 and copies >= 1, got {decoded_bytes} and {copies}")
    if budget_bytes is None:
        avail = available_memory_bytes()
        budget_bytes = int(avail * DEFAULT_MEMORY_FRACTION)
        budget_txt = f"the budget {_fmt(budget_bytes)} ({DEFAULT_MEMORY_FRACTION:.0%} of {_fmt(avail)} available memory)"
    else:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        budget_txt = f"the budget {_fmt(budget_bytes)}"
    need = int(decoded_bytes) * int(copies)
    need_txt = f"{_fmt(decoded_bytes)} decoded" + (f" x {copies} processes" if copies > 1 else "")
    fits = need <= budget_bytes
    if override == "stream":
        return "stream", f"stream: forced ({need_txt}, {'within' if fits else 'over'} {budget_txt})"
    if override == "memory":
        return "memory", f"memory: forced ({need_txt}, {'within' if fits else 'OVER'} {budget_txt})"
    if fits:
        return "memory", f"memory: {need_txt} fits {budget_txt}"
    return "stream", f"stream: {need_txt} exceeds {budget_txt}"
