"""ImageNet-Patch: safe loading, per-image random patch application, and evaluation.

Source
------
M. Pintor, D. Angioni, A. Sotgiu, L. Demetrio, A. Demontis, B. Biggio, F. Roli, "ImageNet-Patch: A dataset for
benchmarking machine learning robustness against adversarial patches", Pattern Recognition 134 (2023) 109064
(arXiv:2203.04412). The patches are the ``assets/imagenet_patch.gz`` file of the public repository
pralab/ImageNet-Patch, licensed CC BY 4.0 (the repository's code is GPL-3.0; none of it is used here: everything
below is implemented from the description in ``../shared/docs/reference.md`` section 5 and
``../shared/data/imagenet-patch/README.md``).

The file
--------
``../shared/data/imagenet-patch/imagenet_patch.gz`` (254,407 bytes, sha256
``8652d39277ea9cb9a59025240d16b2ae399eb8f33ef5bd55076c4e23c7c99aea``) is a gzip of a Python pickle (protocol 4,
6,022,113 bytes uncompressed) written with PyTorch, holding the tuple ``(patches, targets, info)``:

* ``patches``: float32 ``(10, 3, 224, 224)`` in [0, 1], non-zero only in the centred 50x50 square (rows and
  columns 87-136). Some pixels *inside* the square are black (753 pixel positions are 0 in all three channels),
  so the mask is the centred ``info['patch_size']`` square, never "the non-zero pixels".
* ``targets``: float32 ``(10,)`` ImageNet-1k indices ``[804, 513, 923, 954, 968, 878, 546, 585, 806, 487]``
  (soap dispenser, cornet, plate, banana, cup, typewriter keyboard, electric guitar, hair spray, sock, cellular
  telephone), cast to long here.
* ``info``: ``{'patch_size': 50, 'target_names': {index: name}, 'patch_type': 'square',
  'input_shape': (3, 224, 224)}``.

What the pickle contains (``pickletools.dis``), and why a plain ``pickle.load`` is unsafe
-----------------------------------------------------------------------------------------
The outer pickle uses exactly three globals: ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``
and ``collections.OrderedDict`` (the empty backward-hooks dict); the ``info`` dict needs no global at all. Each
tensor is ``_rebuild_tensor_v2(_load_from_bytes(<bytes>), offset, size, stride, requires_grad, OrderedDict())``.
``torch.storage._load_from_bytes`` calls ``torch.load(BytesIO(bytes), weights_only=False)``: a plain unpickle
hands those embedded bytes to a second, unrestricted unpickler, so *any* file at that path could run arbitrary code.

The embedded bytes are PyTorch's legacy (pre-zip) serialization format: five small protocol-2 pickles -- the
magic number ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a sys-info dict (``little_endian``,
``type_sizes``), the storage object itself as a persistent id
``('storage', torch.FloatStorage, key, 'cpu', numel, None)``, and the list of storage keys -- followed, for each
key, by the element count as a little-endian int64 and the raw little-endian float32 data.

:func:`load_imagenet_patch` therefore never calls anything the file names. A restricted :class:`pickle.Unpickler`
maps the three allowed outer globals to local, validating replacements (any other global raises
:class:`PatchFileError` before anything is built); the replacement for ``_load_from_bytes`` parses the legacy
format itself (header pickles through an unpickler that allows no global at all, the storage pickle through one
that allows only ``torch.FloatStorage`` as a dtype marker, persistent ids checked field by field) and rebuilds the
data from the raw bytes with :func:`torch.frombuffer`. The sha256 of the file is checked first by default.

Application (reference section 5)
---------------------------------
One random pose per image: rotation U(-45, 45) degrees, translation up to 0.2 of the image size in each axis,
scale U(0.7, 1) (the repository's README says U(0.5, 1)), nearest interpolation, fill 0, applied to patch and mask
alike; then ``x' = x (1 - M) + P M`` on [0, 1] images (after Resize(256)/CenterCrop(224), before normalisation).
The reference code draws one pose per batch; this module draws one per image. The patch side on the output image
is ``patch_fraction * min(H, W)`` before the random scale (50 px on a 224 image), so the patch covers about 5 % of
a 224x224 image (50^2 / 224^2 = 4.98 %) before scaling -- larger than a "2 % patch" of certified defenses: a
certificate for a 2 % patch does not cover this attack.

Metrics: clean accuracy, robust accuracy (prediction still equals the label) and targeted success rate
(prediction equals the patch's target class), each per patch and averaged.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import re
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

#: sha256 of ``imagenet_patch.gz`` as copied from pralab/ImageNet-Patch commit 1a8600c (see the data README).
IMAGENET_PATCH_SHA256 = "8652d39277ea9cb9a59025240d16b2ae399eb8f33ef5bd55076c4e23c7c99aea"
#: ImageNet-1k target class of each of the 10 patches, in file order.
IMAGENET_PATCH_TARGETS = (804, 513, 923, 954, 968, 878, 546, 585, 806, 487)
#: ImageNet-1k indices of Imagenette's 10 classes, in Imagenette's label order (a ``label_to_imagenet`` mapping).
IMAGENETTE_CLASS_INDICES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)

#: Environment variable that overrides the default file location.
ENV_VAR = "BAGCERT_IMAGENET_PATCH"
_DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "imagenet-patch" / "imagenet_patch.gz"

# The real file is 254 KB compressed, 6 MB uncompressed; refuse anything absurdly larger (gzip bombs).
_MAX_FILE_BYTES = 64 * 1024 * 1024
_MAX_PICKLE_BYTES = 256 * 1024 * 1024

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001
_NUM_IMAGENET_CLASSES = 1000


class PatchFileError(ValueError):
    """An ImageNet-Patch file is missing, corrupt, truncated, has the wrong checksum or asks to run code."""


# --------------------------------------------------------------------------------------------- safe loading


_NOTHING_RAN = "nothing from the file was run"


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` inside the embedded storage pickle: only a dtype marker."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


_FLOAT_STORAGE = _StorageType("FloatStorage", torch.float32)


class _StorageRef:
    """What the storage pickle's persistent id resolves to, before the raw data is read."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel


class _LoadedStorage:
    """A storage rebuilt from raw bytes: a flat, freshly allocated tensor that owns its memory."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler for plain data (numbers, strings, dicts, lists, tuples): refuses every global."""

    where = "an embedded storage header"

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise PatchFileError(
            f"refused global {module}.{name} in {self.where} of the patch file: no global is allowed there; "
            f"loading stopped and {_NOTHING_RAN}"
        )

    def persistent_load(self, pid):
        raise PatchFileError(
            f"unexpected persistent id {pid!r} in {self.where} of the patch file; loading stopped and {_NOTHING_RAN}"
        )


class _StorageUnpickler(_NoGlobalsUnpickler):
    """Unpickler for the storage record of PyTorch's legacy format: allows ``torch.FloatStorage`` only."""

    where = "an embedded storage record"
    _allowed = {("torch", "FloatStorage"): _FLOAT_STORAGE}

    def __init__(self, file):
        super().__init__(file)
        self.refs: list[_StorageRef] = []

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PatchFileError(
                f"refused global {module}.{name} in {self.where} of the patch file (allowed: torch.FloatStorage); "
                f"loading stopped and {_NOTHING_RAN}"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise PatchFileError(f"unexpected persistent id {pid!r} in {self.where} of the patch file")
        _, storage_type, key, location, numel, view_metadata = pid
        if storage_type is not _FLOAT_STORAGE:
            raise PatchFileError(f"storage type {storage_type!r} is not torch.FloatStorage")
        if not isinstance(key, str) or not isinstance(location, str) or re.fullmatch(r"cpu|cuda(:\d+)?", location) is None:
            raise PatchFileError(f"malformed storage key/location {key!r}/{location!r} in the patch file")
        if type(numel) is not int or numel < 0:
            raise PatchFileError(f"malformed storage size {numel!r} in the patch file")
        if view_metadata is not None:
            raise PatchFileError("storage views are not supported in the patch file")
        ref = _StorageRef(key, storage_type, numel)
        self.refs.append(ref)
        return ref


def _load_plain_pickle(stream: io.BytesIO, unpickler_cls, what: str):
    try:
        return unpickler_cls(stream).load()
    except PatchFileError:
        raise
    except Exception as exc:  # any parse error of untrusted bytes is a corrupt file
        raise PatchFileError(f"corrupt {what} in the patch file ({type(exc).__name__}: {exc})") from None


def _safe_load_from_bytes(blob) -> _LoadedStorage:
    """Local replacement for ``torch.storage._load_from_bytes``: parse the legacy format, run nothing."""
    if not isinstance(blob, (bytes, bytearray)):
        raise PatchFileError(f"_load_from_bytes expects bytes, the patch file passed {type(blob).__name__}")
    blob = bytes(blob)
    if blob[:2] == b"PK":
        raise PatchFileError(
            "the embedded storage is a zip archive (new torch format), not the legacy format of the ImageNet-Patch "
            f"file; refused, {_NOTHING_RAN}"
        )
    stream = io.BytesIO(blob)
    magic = _load_plain_pickle(stream, _NoGlobalsUnpickler, "storage magic number")
    if magic != _TORCH_LEGACY_MAGIC or type(magic) is not int:
        raise PatchFileError(f"embedded storage has a wrong magic number {magic!r}: not torch's legacy format")
    protocol = _load_plain_pickle(stream, _NoGlobalsUnpickler, "storage protocol version")
    if protocol != _TORCH_LEGACY_PROTOCOL or type(protocol) is not int:
        raise PatchFileError(f"embedded storage has protocol version {protocol!r}, expected {_TORCH_LEGACY_PROTOCOL}")
    sys_info = _load_plain_pickle(stream, _NoGlobalsUnpickler, "storage sys_info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise PatchFileError(f"embedded storage sys_info {sys_info!r} is not a little-endian record")
    unpickler = _StorageUnpickler(stream)
    try:
        ref = unpickler.load()
    except PatchFileError:
        raise
    except Exception as exc:
        raise PatchFileError(f"corrupt storage record in the patch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(ref, _StorageRef) or len(unpickler.refs) != 1:
        raise PatchFileError("the embedded storage record does not hold exactly one storage")
    keys = _load_plain_pickle(stream, _NoGlobalsUnpickler, "storage key list")
    if keys != [ref.key]:
        raise PatchFileError(f"embedded storage key list {keys!r} does not match the storage key {ref.key!r}")
    header = stream.read(8)
    if len(header) != 8:
        raise PatchFileError("embedded storage is truncated (missing element count)")
    (count,) = struct.unpack("<q", header)
    if count != ref.numel:
        raise PatchFileError(f"embedded storage declares {ref.numel} elements but its data header says {count}")
    itemsize = torch.empty((), dtype=ref.storage_type.dtype).element_size()
    nbytes = count * itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
        raise PatchFileError(f"embedded storage is truncated: expected {nbytes} data bytes, found {len(raw)}")
    if stream.read(1):
        raise PatchFileError("embedded storage has trailing bytes after its data")
    if count == 0:
        return _LoadedStorage(torch.empty(0, dtype=ref.storage_type.dtype))
    if np.little_endian:
        data = torch.frombuffer(bytearray(raw), dtype=ref.storage_type.dtype)  # writable copy owned by the tensor
    else:  # the file stores little-endian floats
        data = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    return _LoadedStorage(data)


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _safe_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Local replacement for ``torch._utils._rebuild_tensor_v2``: bounds-checked view, then a copy."""
    if not (
        isinstance(storage, _LoadedStorage)
        and isinstance(storage.data, torch.Tensor)
        and storage.data.dim() == 1
        and storage.data.dtype == torch.float32
    ):
        raise PatchFileError(
            f"_rebuild_tensor_v2 got a {type(storage).__name__} instead of a storage loaded from the file's bytes"
        )
    if type(storage_offset) is not int or storage_offset < 0:
        raise PatchFileError(f"bad tensor storage offset {storage_offset!r}")
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise PatchFileError(f"bad tensor size/stride {size!r}/{stride!r}")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise PatchFileError(f"negative tensor size/stride {size!r}/{stride!r}")
    if not isinstance(requires_grad, bool):
        raise PatchFileError(f"bad requires_grad flag {requires_grad!r}")
    if not isinstance(backward_hooks, dict) or len(backward_hooks) != 0:
        raise PatchFileError("tensors in the patch file must not carry backward hooks")
    if metadata is not None and metadata != {}:
        raise PatchFileError(f"unexpected tensor metadata {metadata!r}")
    numel = storage.data.numel()
    if math.prod(size) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise PatchFileError(
                f"tensor of size {size} and stride {stride} at offset {storage_offset} reads past its storage "
                f"of {numel} elements"
            )
    return torch.as_strided(storage.data, size, stride, storage_offset).clone(memory_format=torch.contiguous_format)


class _Allowed:
    """An allowed global as the pickle sees it: a callable with no attributes at all (``__slots__ = ()``), so a
    BUILD opcode aimed at it fails instead of changing, say, the ``__defaults__`` of the function behind it."""

    __slots__ = ()
    _fn: Callable

    def __call__(self, *args):
        return type(self)._fn(*args)


class _AllowedRebuildTensorV2(_Allowed):
    __slots__ = ()
    _fn = staticmethod(_safe_rebuild_tensor_v2)


class _AllowedLoadFromBytes(_Allowed):
    __slots__ = ()
    _fn = staticmethod(_safe_load_from_bytes)


class _AllowedOrderedDict(_Allowed):
    __slots__ = ()
    _fn = staticmethod(OrderedDict)


class _PatchFileUnpickler(pickle.Unpickler):
    """Restricted unpickler for the outer pickle: an explicit allow-list mapped to local replacements."""

    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _AllowedRebuildTensorV2(),
        ("torch.storage", "_load_from_bytes"): _AllowedLoadFromBytes(),
        ("collections", "OrderedDict"): _AllowedOrderedDict(),
    }

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.allowed)
            raise PatchFileError(
                f"refused global {module}.{name}: the patch file asks for a global outside the allow-list "
                f"({allowed}); loading stopped and {_NOTHING_RAN}"
            ) from None

    def persistent_load(self, pid):
        raise PatchFileError(f"unexpected persistent id {pid!r} in the patch file; {_NOTHING_RAN}")


# --------------------------------------------------------------------------------------------- the data set


@dataclass(eq=False)
class ImageNetPatch:
    """The ImageNet-Patch set.

    Attributes:
        patches: float32 ``[N, 3, S, S]`` in [0, 1] (N = 10, S = 224): each patch on its canvas.
        masks: float32 ``[N, 1, S, S]``: 1 on the centred ``patch_size`` square (rows/cols 87-136), 0 elsewhere.
        targets: long ``[N]``: the ImageNet-1k class each patch was optimised towards.
        info: the file's info dict (``patch_size``, ``target_names``, ``patch_type``, ``input_shape``).
        target_names: name of each patch's target class, in patch order.
        path: the file it was loaded from (None when built in memory).
        sha256: the file's sha256 (None when built in memory).
    """

    patches: torch.Tensor
    masks: torch.Tensor
    targets: torch.Tensor
    info: dict
    target_names: list = field(default_factory=list)
    path: Path | None = None
    sha256: str | None = None

    def __post_init__(self):
        if self.patches.dim() != 4 or self.patches.shape[1] != 3:
            raise ValueError(f"patches must be [N, 3, S, S], got {tuple(self.patches.shape)}")
        n, _, h, w = self.patches.shape
        if tuple(self.masks.shape) != (n, 1, h, w):
            raise ValueError(f"masks must be [{n}, 1, {h}, {w}], got {tuple(self.masks.shape)}")
        if tuple(self.targets.shape) != (n,):
            raise ValueError(f"targets must be [{n}], got {tuple(self.targets.shape)}")
        if self.target_names and len(self.target_names) != n:
            raise ValueError(f"{len(self.target_names)} target names for {n} patches")

    def __len__(self) -> int:
        return self.patches.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageNetPatch({len(self)} patches {tuple(self.patches.shape[1:])}, patch_size={self.info.get('patch_size')}, "
            f"targets={self.targets.tolist()}, path={str(self.path) if self.path else None!r})"
        )

    @property
    def patch_size(self) -> int:
        return int(self.info["patch_size"])

    def to(self, device) -> "ImageNetPatch":
        """A copy with patches, masks and targets on ``device``."""
        return ImageNetPatch(
            self.patches.to(device), self.masks.to(device), self.targets.to(device), self.info,
            list(self.target_names), self.path, self.sha256,
        )


def default_imagenet_patch_path() -> Path:
    """``$BAGCERT_IMAGENET_PATCH`` if set, else ``../shared/data/imagenet-patch/imagenet_patch.gz`` relative to
    the repository root (the parent folder of the ``bagcert`` package)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent.parent
    return (repo_root / _DEFAULT_RELATIVE).resolve()


def _centred_square_masks(n: int, height: int, width: int, patch_size: int) -> torch.Tensor:
    top, left = (height - patch_size) // 2, (width - patch_size) // 2
    masks = torch.zeros(n, 1, height, width, dtype=torch.float32)
    masks[:, :, top : top + patch_size, left : left + patch_size] = 1.0
    return masks


def _validate_content(obj, path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if not isinstance(obj, tuple) or len(obj) != 3:
        kind = f"a {len(obj)}-tuple" if isinstance(obj, tuple) else f"a {type(obj).__name__}"
        raise PatchFileError(f"{path}: expected the tuple (patches, targets, info), found {kind}")
    patches, targets, info = obj
    if not isinstance(patches, torch.Tensor) or patches.dtype != torch.float32:
        raise PatchFileError(f"{path}: patches must be a float32 tensor")
    if patches.dim() != 4 or patches.shape[1] != 3 or patches.shape[0] == 0:
        raise PatchFileError(f"{path}: patches must have shape [N, 3, H, W] with N >= 1, got {tuple(patches.shape)}")
    if not torch.isfinite(patches).all():
        raise PatchFileError(f"{path}: patches contain NaN or Inf")
    lo, hi = float(patches.min()), float(patches.max())
    if lo < 0.0 or hi > 1.0:
        raise PatchFileError(f"{path}: patch values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    n, _, height, width = patches.shape
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise PatchFileError(f"{path}: targets must be a 1-D tensor of length {n} (one per patch), got {shape}")
    if not torch.isfinite(targets).all() or not torch.equal(targets, targets.round()):
        raise PatchFileError(f"{path}: targets must hold whole class indices, got {targets.tolist()}")
    targets = targets.to(torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= _NUM_IMAGENET_CLASSES:
        raise PatchFileError(f"{path}: targets must be ImageNet-1k indices in [0, 999], got {targets.tolist()}")
    if not isinstance(info, dict):
        raise PatchFileError(f"{path}: info must be a dict, got {type(info).__name__}")
    patch_size = info.get("patch_size")
    if type(patch_size) is not int or not 0 < patch_size <= min(height, width):
        raise PatchFileError(f"{path}: info['patch_size'] must be an int in [1, {min(height, width)}], got {patch_size!r}")
    if info.get("patch_type", "square") != "square":
        raise PatchFileError(f"{path}: only square patches are supported, got patch_type {info.get('patch_type')!r}")
    input_shape = info.get("input_shape")
    if input_shape is not None and tuple(input_shape) != tuple(patches.shape[1:]):
        raise PatchFileError(f"{path}: info['input_shape'] {input_shape!r} does not match patches {tuple(patches.shape)}")
    names = info.get("target_names", {})
    if not isinstance(names, dict):
        raise PatchFileError(f"{path}: info['target_names'] must be a dict")
    return patches.contiguous(), targets, info


def _read_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PatchFileError(
            f"ImageNet-Patch file not found: {path} (pass a path, or set ${ENV_VAR}); "
            "the file is assets/imagenet_patch.gz of pralab/ImageNet-Patch"
        ) from None
    if size > _MAX_FILE_BYTES:
        raise PatchFileError(f"{path} is {size} bytes; the ImageNet-Patch file is about 254 KB: refused")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PatchFileError(f"cannot read the ImageNet-Patch file {path}: {exc}") from None


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(_MAX_PICKLE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise PatchFileError(f"{path} is not a valid or complete gzip file ({type(exc).__name__}: {exc})") from None
    if len(data) > _MAX_PICKLE_BYTES:
        raise PatchFileError(f"{path} decompresses to more than {_MAX_PICKLE_BYTES} bytes: refused")
    return data


def load_imagenet_patch(path: str | os.PathLike | None = None, verify_checksum: bool = True) -> ImageNetPatch:
    """Load the ImageNet-Patch set without running anything from the file.

    Args:
        path: the ``imagenet_patch.gz`` file; default :func:`default_imagenet_patch_path` (``$BAGCERT_IMAGENET_PATCH``
            or ``../shared/data/imagenet-patch/imagenet_patch.gz`` next to the repository).
        verify_checksum: compare the file's sha256 with :data:`IMAGENET_PATCH_SHA256` before parsing it. With
            False, any well-formed file of the same layout loads -- still only through the allow-list.

    Returns:
        :class:`ImageNetPatch` with ``patches`` [N, 3, S, S], ``masks`` [N, 1, S, S] (the centred
        ``info['patch_size']`` square), ``targets`` long [N], ``info`` and ``target_names``.

    Raises:
        PatchFileError: missing file, checksum mismatch, corrupt or truncated gzip/pickle, a global outside the
            allow-list (the error names it; nothing from the file ran), or content of the wrong shape/range.
    """
    path = default_imagenet_patch_path() if path is None else Path(path)
    raw = _read_file(path)
    digest = hashlib.sha256(raw).hexdigest()
    if verify_checksum and digest != IMAGENET_PATCH_SHA256:
        raise PatchFileError(
            f"checksum mismatch for {path}: expected sha256 {IMAGENET_PATCH_SHA256} (the ImageNet-Patch file of "
            f"pralab/ImageNet-Patch), got {digest}; the file was not parsed. Pass verify_checksum=False to load "
            "another file of the same layout (still through the allow-list)"
        )
    data = _gunzip(raw, path)
    try:
        obj = _PatchFileUnpickler(io.BytesIO(data)).load()
    except PatchFileError as exc:
        raise PatchFileError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated or malformed pickle stream
        raise PatchFileError(
            f"{path} holds a corrupt or truncated pickle ({type(exc).__name__}: {exc}); {_NOTHING_RAN}"
        ) from None
    patches, targets, info = _validate_content(obj, path)
    n, _, height, width = patches.shape
    masks = _centred_square_masks(n, height, width, info["patch_size"])
    names_by_index = info.get("target_names", {})
    target_names = [str(names_by_index.get(t, f"class {t}")) for t in targets.tolist()]
    return ImageNetPatch(patches, masks, targets, info, target_names, path, digest)


# --------------------------------------------------------------------------------------------- application


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] (3 RGB channels), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype} (uint8: divide by 255)")
    if images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf; expected finite values in [0, 1]")
    lo, hi = (float(v) for v in torch.aminmax(images))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"image values must lie in [0, 1] (apply patches before normalisation), found [{lo:.4g}, {hi:.4g}]"
        )


def _check_range(name: str, value, lo_bound=None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a finite (low, high) pair with low <= high, got {value!r}")
    if lo_bound is not None and lo <= lo_bound:
        raise ValueError(f"{name} must be > {lo_bound}, got {value!r}")
    return lo, hi


def _check_pose_params(rotation, translation, scale, patch_fraction):
    rotation = _check_range("rotation", rotation)
    scale = _check_range("scale", scale, lo_bound=0.0)
    translation = float(translation)
    if not math.isfinite(translation) or translation < 0:
        raise ValueError(f"translation must be a fraction >= 0 of the image size, got {translation!r}")
    patch_fraction = float(patch_fraction)
    if not 0 < patch_fraction <= 1:
        raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction!r}")
    return rotation, translation, scale, patch_fraction


def _check_patch_and_mask(patch, mask, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(patch, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError("patch and mask must be torch.Tensors")
    if patch.dim() == 3:
        patch = patch.unsqueeze(0)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if patch.dim() != 4 or patch.shape[1] != 3:
        raise ValueError(f"patch must be [3, S, S] (or [B, 3, S, S]), got {tuple(patch.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [1, S, S] (or [B, 1, S, S]), got {tuple(mask.shape)}")
    if patch.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"patch {tuple(patch.shape)} and mask {tuple(mask.shape)} must share the canvas size")
    for name, t in (("patch", patch), ("mask", mask)):
        if t.shape[0] not in (1, batch):
            raise ValueError(f"{name} batch dimension {t.shape[0]} does not match {batch} images")
    if not patch.is_floating_point():
        raise ValueError(f"patch must be floating point in [0, 1], got {patch.dtype}")
    mask = mask.float() if mask.dtype == torch.bool or not mask.is_floating_point() else mask
    for name, t in (("patch", patch), ("mask", mask)):
        if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1:
            raise ValueError(f"{name} values must be finite and lie in [0, 1]")
    if not (mask > 0).flatten(1).any(1).all():
        raise ValueError("mask is empty: it must be 1 where the patch is")
    return patch, mask


def _mask_side(mask: torch.Tensor) -> torch.Tensor:
    """Side in canvas pixels of each mask's support (the larger bounding-box extent), float64 [B]."""
    support = mask[:, 0] > 0
    sides = []
    for dim in (2, 1):  # rows: any over columns; columns: any over rows
        present = support.any(dim)
        idx = torch.arange(present.shape[1], device=mask.device).expand_as(present)
        first = torch.where(present, idx, present.shape[1]).min(1).values
        last = torch.where(present, idx, -1).max(1).values
        sides.append((last - first + 1).to(torch.float64))
    return torch.maximum(sides[0], sides[1]).cpu()


def _sample_poses(batch: int, generator, rotation, translation, scale) -> torch.Tensor:
    """[B, 4] float64 on CPU: angle (degrees), tx and ty (fractions of W and H), scale. One row per image."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64, device=device).cpu()
    angle = rotation[0] + (rotation[1] - rotation[0]) * u[:, 0]
    tx = (2 * u[:, 1] - 1) * translation
    ty = (2 * u[:, 2] - 1) * translation
    s = scale[0] + (scale[1] - scale[0]) * u[:, 3]
    return torch.stack([angle, tx, ty, s], dim=1)


def _pose_theta(poses, side, canvas_hw, image_hw, patch_fraction) -> torch.Tensor:
    """Affine matrices [B, 2, 3] (output -> canvas, normalised coordinates, align_corners=False).

    The forward map sends a canvas point p (pixels, relative to the canvas centre) to the image point
    ``k R(angle) p + t`` (pixels, relative to the image centre), with ``k = patch_fraction * min(H, W) * scale / side``;
    x points right and y down, so a positive angle turns the patch clockwise as displayed.
    """
    sh, sw = canvas_hw
    h, w = image_hw
    a = torch.deg2rad(poses[:, 0])
    c, s = torch.cos(a), torch.sin(a)
    tx, ty = poses[:, 1] * w, poses[:, 2] * h
    k = patch_fraction * min(h, w) * poses[:, 3] / side
    theta = torch.empty(poses.shape[0], 2, 3, dtype=torch.float64)
    # canvas_norm = D_in^-1 R(-angle) (D_out out_norm - t) / k, with D = diag(width / 2, height / 2)
    theta[:, 0, 0] = c * w / (sw * k)
    theta[:, 0, 1] = s * h / (sw * k)
    theta[:, 1, 0] = -s * w / (sh * k)
    theta[:, 1, 1] = c * h / (sh * k)
    theta[:, 0, 2] = -2 * (c * tx + s * ty) / (sw * k)
    theta[:, 1, 2] = -2 * (-s * tx + c * ty) / (sh * k)
    return theta


def apply_patch(
    images: torch.Tensor,
    patch: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
    rotation: tuple[float, float] = (-45.0, 45.0),
    translation: float = 0.2,
    scale: tuple[float, float] = (0.7, 1.0),
    patch_fraction: float = 50 / 224,
    return_masks: bool = False,
):
    """Paste a patch onto each image with its own random pose: ``x' = x (1 - M) + P M``.

    Args:
        images: float ``[B, 3, H, W]`` in [0, 1] (any H, W; CPU or CUDA), before normalisation.
        patch: ``[3, S, S]`` (or ``[B, 3, S, S]``) patch canvas in [0, 1], as loaded (S = 224).
        mask: ``[1, S, S]`` (or ``[B, 1, S, S]``, float or bool): 1 on the patch square of the canvas.
        generator: source of the poses (seed it for reproducible results); None uses torch's global RNG. Each
            call draws ``torch.rand(B, 4, dtype=float64)`` on the generator's device: per image, in this order,
            the angle, x shift, y shift and scale.
        rotation: angle range in degrees, U(rotation).
        translation: shift of the patch centre from the image centre, U(-t, t) times the image width (x) and
            height (y).
        scale: U(scale) factor on the patch side.
        patch_fraction: side of the mask's square on the output image, as a fraction of ``min(H, W)``, before the
            random scale (50/224: the 50 px square stays 50 px on a 224 image and becomes ~7 px on 32x32).
        return_masks: also return the transformed masks ``[B, 1, H, W]``.

    Patch and mask are resampled together with one batched ``affine_grid``/``grid_sample`` (nearest, zero fill,
    ``align_corners=False``), so the patch lands exactly where the mask does; pixels outside the transformed mask
    are returned unchanged. Returns the patched images (same dtype/device), and the masks if asked.
    """
    _check_images(images)
    rotation, translation, scale, patch_fraction = _check_pose_params(rotation, translation, scale, patch_fraction)
    batch, _, height, width = images.shape
    patch, mask = _check_patch_and_mask(patch, mask, batch)
    if batch == 0:
        empty_masks = images.new_zeros(0, 1, height, width)
        return (images.clone(), empty_masks) if return_masks else images.clone()
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    device = images.device
    poses = _sample_poses(batch, generator, rotation, translation, scale)
    side = _mask_side(mask).expand(batch) if mask.shape[0] == 1 else _mask_side(mask)
    theta = _pose_theta(poses, side, tuple(patch.shape[-2:]), (height, width), patch_fraction)
    canvas = torch.cat(
        [
            patch.to(device=device, dtype=work).expand(batch, -1, -1, -1),
            mask.to(device=device, dtype=work).expand(batch, -1, -1, -1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta.to(device=device, dtype=work), [batch, 4, height, width], align_corners=False)
    sampled = F.grid_sample(canvas, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    p, m = sampled[:, :3], sampled[:, 3:]
    x = images.to(work)
    out = (x * (1 - m) + p * m).clamp_(0.0, 1.0).to(images.dtype)
    if return_masks:
        return out, m.to(images.dtype)
    return out


class PatchApplier:
    """The application parameters of :func:`apply_patch`, optionally bound to a loaded :class:`ImageNetPatch`.

    ``applier(images, 3, generator=g)`` applies patch 3 of the bound set; ``applier(images, patch, mask)`` applies
    explicit tensors.
    """

    def __init__(
        self,
        patch_set: ImageNetPatch | None = None,
        rotation: tuple[float, float] = (-45.0, 45.0),
        translation: float = 0.2,
        scale: tuple[float, float] = (0.7, 1.0),
        patch_fraction: float = 50 / 224,
    ):
        self.rotation, self.translation, self.scale, self.patch_fraction = _check_pose_params(
            rotation, translation, scale, patch_fraction
        )
        self.patch_set = patch_set

    def params(self) -> dict:
        return {
            "rotation": self.rotation,
            "translation": self.translation,
            "scale": self.scale,
            "patch_fraction": self.patch_fraction,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"PatchApplier({args}, patch_set={'bound' if self.patch_set is not None else None})"

    def __call__(self, images, patch, mask=None, *, generator=None, return_masks=False, patch_set=None):
        """Apply ``patch`` (an index into ``patch_set``/the bound set, or a ``[3, S, S]`` tensor with ``mask``)."""
        if isinstance(patch, int) and not isinstance(patch, bool):
            patch_set = patch_set if patch_set is not None else self.patch_set
            if patch_set is None:
                raise ValueError("a patch index needs a patch set: PatchApplier(patch_set) or patch_set=...")
            if mask is not None:
                raise ValueError("pass either a patch index or a (patch, mask) pair, not an index and a mask")
            if not 0 <= patch < len(patch_set):
                raise ValueError(f"patch index {patch} out of range for {len(patch_set)} patches")
            patch, mask = patch_set.patches[patch], patch_set.masks[patch]
        elif mask is None:
            raise ValueError("an explicit patch tensor needs its mask")
        return apply_patch(images, patch, mask, generator=generator, return_masks=return_masks, **self.params())


# --------------------------------------------------------------------------------------------- evaluation


def _predict(predict_fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pred = predict_fn(x)
    pred = torch.as_tensor(pred)
    if pred.is_floating_point() or pred.dtype == torch.bool:
        raise ValueError(
            f"predict_fn must return integer class indices of shape [{x.shape[0]}], got dtype {pred.dtype} "
            "(take argmax of the logits)"
        )
    if tuple(pred.shape) != (x.shape[0],):
        raise ValueError(f"predict_fn must return shape [{x.shape[0]}], got {tuple(pred.shape)}")
    return pred.to(device="cpu", dtype=torch.long)


def evaluate_imagenet_patch(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    patch_set: ImageNetPatch,
    label_to_imagenet: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    applier: PatchApplier | None = None,
) -> dict:
    """Clean accuracy, and per patch and averaged robust accuracy and targeted success rate.

    Args:
        predict_fn: ``[b, 3, H, W]`` images in [0, 1] -> long predictions ``[b]`` in the model's label space.
        images: float ``[N, 3, H, W]`` in [0, 1] (the model's input size; CPU or CUDA).
        labels: ``[N]`` true labels in the model's label space.
        patch_set: the loaded :class:`ImageNetPatch`.
        label_to_imagenet: ImageNet-1k index of each model label (e.g. :data:`IMAGENETTE_CLASS_INDICES` for a
            10-class Imagenette model); None means the model's labels are ImageNet-1k indices. A patch whose target
            is not in this list cannot be predicted: its targeted success rate is None (not 0), it carries
            ``target_in_label_set: False`` and it counts only for robust accuracy.
        generator: pose generator; None uses ``torch.Generator().manual_seed(0)`` so results are reproducible.
            Poses are drawn patch by patch, batch by batch (a fresh pose per image and patch).
        batch_size: images per call of ``predict_fn``.
        applier: application parameters (default ``PatchApplier()``: rotation +-45, translation 0.2, scale
            0.7-1).

    Returns:
        dict with ``n_images``, ``clean_accuracy``, ``robust_accuracy`` (mean over patches),
        ``targeted_success_rate`` (mean over patches whose target is in the label set, None if none is),
        ``n_patches``, ``n_patches_target_in_label_set``, ``application`` (the pose parameters) and ``per_patch``: a
        list of dicts (``index``, ``target``, ``target_name``, ``target_label``, ``target_in_label_set``,
        ``robust_accuracy``, ``targeted_success_rate``). Rates are over all images (an image whose label is the
        target counts as a targeted success when predicted correctly).
    """
    _check_images(images)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be integer [N] with N = {images.shape[0]}, got {labels.dtype} {tuple(labels.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    labels = labels.to(device="cpu", dtype=torch.long)
    if label_to_imagenet is not None:
        mapping = [int(v) for v in label_to_imagenet]
        if len(set(mapping)) != len(mapping) or any(not 0 <= v < _NUM_IMAGENET_CLASSES for v in mapping):
            raise ValueError("label_to_imagenet must list distinct ImageNet-1k indices in [0, 999]")
        if int(labels.min()) < 0 or int(labels.max()) >= len(mapping):
            raise ValueError(f"labels must lie in [0, {len(mapping) - 1}] (the model's label space)")
        imagenet_to_label = {v: i for i, v in enumerate(mapping)}
    else:
        imagenet_to_label = None
    applier = applier if applier is not None else PatchApplier()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    chunks = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    clean = torch.cat([_predict(predict_fn, images[a:b]) for a, b in chunks])
    clean_accuracy = float((clean == labels).float().mean())

    per_patch = []
    for index in range(len(patch_set)):
        target = int(patch_set.targets[index])
        if imagenet_to_label is None:
            target_label = target
        else:
            target_label = imagenet_to_label.get(target)
        preds = torch.cat(
            [
                _predict(predict_fn, applier(images[a:b], index, generator=generator, patch_set=patch_set))
                for a, b in chunks
            ]
        )
        robust = float((preds == labels).float().mean())
        success = None if target_label is None else float((preds == target_label).float().mean())
        per_patch.append(
            {
                "index": index,
                "target": target,
                "target_name": patch_set.target_names[index] if patch_set.target_names else None,
                "target_label": target_label,
                "target_in_label_set": target_label is not None,
                "robust_accuracy": robust,
                "targeted_success_rate": success,
            }
        )

    successes = [p["targeted_success_rate"] for p in per_patch if p["target_in_label_set"]]
    return {
        "n_images": n,
        "n_patches": len(per_patch),
        "clean_accuracy": clean_accuracy,
        "robust_accuracy": float(np.mean([p["robust_accuracy"] for p in per_patch])),
        "targeted_success_rate": float(np.mean(successes)) if successes else None,
        "n_patches_target_in_label_set": len(successes),
        "application": applier.params(),
        "per_patch": per_patch,
    }
