"""Tests for bagcert.attacks.imagenet_patch: safe loading, per-image patch application, evaluation."""

from __future__ import annotations

import builtins
import contextlib
import gzip
import hashlib
import io
import os
import pickle
import struct
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import torch._utils
import torch.storage

from bagcert.attacks import (
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

REAL_FILE = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "imagenet-patch" / "imagenet_patch.gz"
needs_real_file = pytest.mark.skipif(not REAL_FILE.exists(), reason=f"{REAL_FILE} not present")


# ----------------------------------------------------------------------------------------------- helpers


class _Reduce:
    """Pickles as ``fn(*args)`` without ever calling fn here (pickle records a reference to fn)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _StoragePlaceholder:
    pass


def _legacy_storage_bytes(values: torch.Tensor, storage_record_override=None, sys_info_override=None) -> bytes:
    """Bytes in PyTorch's legacy (pre-zip) format holding one FloatStorage, as in the ImageNet-Patch file."""
    values = values.detach().to(torch.float32).flatten().contiguous()
    key = "12345"
    placeholder = _StoragePlaceholder()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is placeholder:
                return ("storage", torch.FloatStorage, key, "cpu", values.numel(), None)
            return None

    record = io.BytesIO()
    _Pickler(record, protocol=2).dump(placeholder if storage_record_override is None else storage_record_override)
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps(sys_info if sys_info_override is None else sys_info_override, protocol=2),
        record.getvalue(),
        pickle.dumps([key], protocol=2),
        struct.pack("<q", values.numel()),
        values.numpy().astype("<f4").tobytes(),
    ]
    return b"".join(parts)


def _pickled_tensor(t: torch.Tensor, blob: bytes | None = None):
    t = t.to(torch.float32).contiguous()
    blob = _legacy_storage_bytes(t) if blob is None else blob
    storage = _Reduce(torch.storage._load_from_bytes, (blob,))
    return _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, tuple(t.shape), t.stride(), False, OrderedDict()))


def _write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


def _synthetic_set_bytes(n=2, canvas=32, patch_size=8, targets=None, patches=None, info=None) -> bytes:
    lo = (canvas - patch_size) // 2
    if patches is None:
        patches = torch.zeros(n, 3, canvas, canvas)
        patches[:, :, lo : lo + patch_size, lo : lo + patch_size] = torch.rand(n, 3, patch_size, patch_size)
    targets = torch.tensor([float(5 + i) for i in range(n)] if targets is None else targets)
    if info is None:
        info = {
            "patch_size": patch_size,
            "target_names": {int(t): f"class {int(t)}" for t in targets},
            "patch_type": "square",
            "input_shape": (3, canvas, canvas),
        }
    return pickle.dumps((_pickled_tensor(patches), _pickled_tensor(targets), info), protocol=4)


@pytest.fixture(scope="module")
def real_set() -> ImageNetPatch:
    if not REAL_FILE.exists():
        pytest.skip(f"{REAL_FILE} not present")
    return load_imagenet_patch(REAL_FILE)


# ----------------------------------------------------------------------------------------------- loading


@needs_real_file
def test_real_file_loads_with_expected_content(real_set):
    ps = real_set
    assert ps.sha256 == IMAGENET_PATCH_SHA256 == hashlib.sha256(REAL_FILE.read_bytes()).hexdigest()
    assert ps.patches.shape == (10, 3, 224, 224) and ps.patches.dtype == torch.float32
    assert ps.masks.shape == (10, 1, 224, 224)
    assert ps.targets.dtype == torch.long
    assert ps.targets.tolist() == [804, 513, 923, 954, 968, 878, 546, 585, 806, 487] == list(IMAGENET_PATCH_TARGETS)
    assert ps.info["patch_size"] == 50 and ps.info["patch_type"] == "square"
    assert tuple(ps.info["input_shape"]) == (3, 224, 224)
    assert ps.target_names[0] == "soap dispenser" and ps.target_names[-1] == "cellular telephone"
    assert float(ps.patches.min()) >= 0.0 and float(ps.patches.max()) <= 1.0
    nonzero = (ps.patches != 0).any(dim=1).any(dim=0)  # [224, 224]
    rows = nonzero.any(dim=1).nonzero().flatten()
    cols = nonzero.any(dim=0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (87, 136, 87, 136)
    # mask = the centred patch_size square, not the non-zero pixels (some square pixels are black)
    expected = torch.zeros(224, 224)
    expected[87:137, 87:137] = 1
    assert torch.equal(ps.masks, expected.expand(10, 1, 224, 224))
    assert bool(((ps.patches == 0).all(dim=1) & (ps.masks[:, 0] == 1)).any())


@needs_real_file
def test_real_file_matches_torch_weights_only_loader(real_set):
    """The local legacy-format parser agrees with torch.load(weights_only=True) on the file's own storage bytes."""
    import pickletools

    data = gzip.decompress(REAL_FILE.read_bytes())
    blobs = [arg for op, arg, _ in pickletools.genops(data) if op.name == "BINBYTES"]
    assert len(blobs) == 2
    with warnings.catch_warnings():  # torch returns a (deprecated) TypedStorage for a legacy storage file
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.load(io.BytesIO(blobs[0]), weights_only=True)
        assert storage.dtype == torch.float32 and storage.size() == 10 * 3 * 224 * 224
        reference = torch.empty(0, dtype=torch.float32).set_(storage.untyped()).view(10, 3, 224, 224)
    assert torch.equal(reference, real_set.patches)


@needs_real_file
def test_default_path_and_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv("BAGCERT_IMAGENET_PATCH", raising=False)
    assert default_imagenet_patch_path() == REAL_FILE.resolve()
    copy = _write_gz(tmp_path / "copy.gz", gzip.decompress(REAL_FILE.read_bytes()))
    monkeypatch.setenv("BAGCERT_IMAGENET_PATCH", str(copy))
    assert default_imagenet_patch_path() == copy
    loaded = load_imagenet_patch(verify_checksum=False)
    assert loaded.path == copy and loaded.targets.tolist() == list(IMAGENET_PATCH_TARGETS)


@needs_real_file
def test_wrong_checksum_refused_but_loads_without_verification(tmp_path, real_set):
    # same content, recompressed: a different, well-formed file
    other = _write_gz(tmp_path / "recompressed.gz", gzip.decompress(REAL_FILE.read_bytes()))
    assert hashlib.sha256(other.read_bytes()).hexdigest() != IMAGENET_PATCH_SHA256
    with pytest.raises(PatchFileError, match=IMAGENET_PATCH_SHA256) as info:
        load_imagenet_patch(other)
    assert "checksum mismatch" in str(info.value)
    loaded = load_imagenet_patch(other, verify_checksum=False)
    assert torch.equal(loaded.patches, real_set.patches) and torch.equal(loaded.targets, real_set.targets)


def test_well_formed_synthetic_file_loads_through_allow_list(tmp_path):
    path = _write_gz(tmp_path / "synthetic.gz", _synthetic_set_bytes(n=3, canvas=32, patch_size=8))
    ps = load_imagenet_patch(path, verify_checksum=False)
    assert ps.patches.shape == (3, 3, 32, 32) and ps.targets.tolist() == [5, 6, 7]
    assert ps.masks[:, :, 12:20, 12:20].eq(1).all() and ps.masks.sum() == 3 * 64
    assert ps.target_names == ["class 5", "class 6", "class 7"]


def _assert_payload_is_live(payload: bytes, marker: Path) -> None:
    """Positive control: a plain pickle.loads of the payload really does create the marker."""
    assert not marker.exists()
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.mkdir", "builtins.exec"])
def test_malicious_pickle_refused_and_nothing_runs(tmp_path, kind):
    def payload_for(marker: Path) -> bytes:
        if kind == "os.mkdir":
            evil = _Reduce(os.mkdir, (str(marker),))
        else:
            evil = _Reduce(builtins.exec, (f"with open({str(marker)!r}, 'w') as f: f.write('pwned')",))
        return pickle.dumps((evil, None, {}), protocol=4)

    _assert_payload_is_live(payload_for(tmp_path / "control"), tmp_path / "control")

    marker = tmp_path / "marker"
    path = _write_gz(tmp_path / "evil.gz", payload_for(marker))
    with pytest.raises(PatchFileError, match="nothing from the file was run") as info:
        load_imagenet_patch(path, verify_checksum=False)
    assert "refused global" in str(info.value)
    assert ("mkdir" if kind == "os.mkdir" else "builtins.exec") in str(info.value)
    assert not marker.exists()
    with pytest.raises(PatchFileError, match="checksum mismatch"):
        load_imagenet_patch(path)  # default: refused before parsing
    assert not marker.exists()


@pytest.mark.parametrize("where", ["storage record", "sys_info header"])
def test_payload_nested_in_storage_bytes_refused_and_nothing_runs(tmp_path, where):
    def payload_for(marker: Path) -> bytes:
        evil = _Reduce(os.mkdir, (str(marker),))
        if where == "storage record":
            blob = _legacy_storage_bytes(torch.zeros(4), storage_record_override=evil)
        else:
            blob = _legacy_storage_bytes(torch.zeros(4), sys_info_override=evil)
        # the outer pickle uses only allowed globals; the attack hides in the bytes given to _load_from_bytes
        return pickle.dumps((_pickled_tensor(torch.zeros(1, 3, 2, 2), blob=blob), None, {}), protocol=4)

    # positive control: a plain unpickle calls torch.storage._load_from_bytes, i.e. torch.load(weights_only=False)
    # on the embedded bytes, which runs the payload; whether the bogus storage then fails to build is irrelevant
    control = tmp_path / "control"
    with contextlib.suppress(Exception):
        pickle.loads(payload_for(control))
    assert control.exists()

    marker = tmp_path / "marker"
    path = _write_gz(tmp_path / "nested.gz", payload_for(marker))
    with pytest.raises(PatchFileError, match=r"refused global (posix|os)\.mkdir .*nothing from the file was run"):
        load_imagenet_patch(path, verify_checksum=False)
    assert not marker.exists()


def test_build_on_allowed_global_cannot_tamper_with_loader(tmp_path):
    """BUILD aimed at an allowed global (to overwrite e.g. its __defaults__) fails and changes nothing."""
    def s(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    tamper = (
        b"\x80\x04" + s("torch._utils") + s("_rebuild_tensor_v2") + b"\x93"  # the allowed global
        + b"N}" + s("__defaults__") + s("x") + b"\x85s\x86b"  # BUILD with state (None, {'__defaults__': ('x',)})
        + b"."
    )
    with pytest.raises(PatchFileError):
        load_imagenet_patch(_write_gz(tmp_path / "tamper.gz", tamper), verify_checksum=False)
    from bagcert.attacks import imagenet_patch as module

    assert module._safe_rebuild_tensor_v2.__defaults__ == (None,)
    ok = load_imagenet_patch(_write_gz(tmp_path / "ok.gz", _synthetic_set_bytes(n=1)), verify_checksum=False)
    assert ok.patches.shape == (1, 3, 32, 32)


def test_nested_zip_storage_refused(tmp_path):
    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf)
    payload = pickle.dumps((_pickled_tensor(torch.zeros(4), blob=buf.getvalue()), None, {}), protocol=4)
    with pytest.raises(PatchFileError, match="zip archive"):
        load_imagenet_patch(_write_gz(tmp_path / "zip.gz", payload), verify_checksum=False)


@needs_real_file
def test_truncated_file_refused(tmp_path):
    raw = REAL_FILE.read_bytes()
    half = tmp_path / "half.gz"
    half.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PatchFileError, match="not a valid or complete gzip"):
        load_imagenet_patch(half, verify_checksum=False)
    with pytest.raises(PatchFileError, match="checksum mismatch"):
        load_imagenet_patch(half)
    # a complete gzip holding the first half of the pickle
    data = gzip.decompress(raw)
    cut = _write_gz(tmp_path / "cut.gz", data[: len(data) // 2])
    with pytest.raises(PatchFileError, match="corrupt or truncated pickle|truncated"):
        load_imagenet_patch(cut, verify_checksum=False)


def test_corrupt_and_missing_files_refused(tmp_path):
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"this is not gzip at all")
    with pytest.raises(PatchFileError, match="gzip"):
        load_imagenet_patch(garbage, verify_checksum=False)
    with pytest.raises(PatchFileError, match="pickle"):
        load_imagenet_patch(_write_gz(tmp_path / "junk.gz", b"\x80\x04junk"), verify_checksum=False)
    with pytest.raises(PatchFileError, match="not found"):
        load_imagenet_patch(tmp_path / "missing.gz")
    assert issubclass(PatchFileError, ValueError)


def test_content_validation(tmp_path):
    bad_range = torch.full((2, 3, 32, 32), 2.0)
    with pytest.raises(PatchFileError, match=r"\[0, 1\]"):
        load_imagenet_patch(_write_gz(tmp_path / "a.gz", _synthetic_set_bytes(patches=bad_range)), verify_checksum=False)
    with pytest.raises(PatchFileError, match="length 2"):
        load_imagenet_patch(
            _write_gz(tmp_path / "b.gz", _synthetic_set_bytes(targets=[1.0, 2.0, 3.0])), verify_checksum=False
        )
    two_channel = torch.zeros(2, 2, 32, 32)
    with pytest.raises(PatchFileError, match=r"\[N, 3, H, W\]"):
        load_imagenet_patch(_write_gz(tmp_path / "c.gz", _synthetic_set_bytes(patches=two_channel)), verify_checksum=False)
    old_format = pickle.dumps((_pickled_tensor(torch.zeros(1, 3, 4, 4)), _pickled_tensor(torch.zeros(1))), protocol=4)
    with pytest.raises(PatchFileError, match="2-tuple"):
        load_imagenet_patch(_write_gz(tmp_path / "d.gz", old_format), verify_checksum=False)


# ----------------------------------------------------------------------------------------------- application


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@needs_real_file
def test_apply_output_range_and_untouched_outside_mask(real_set):
    images = torch.rand(6, 3, 96, 128, generator=_gen(1))
    out, masks = apply_patch(images, real_set.patches[2], real_set.masks[2], generator=_gen(2), return_masks=True)
    assert out.shape == images.shape and masks.shape == (6, 1, 96, 128)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    outside = (masks == 0).expand_as(images)
    assert torch.equal(out[outside], images[outside])
    assert bool((masks == 1).any()) and set(masks.unique().tolist()) <= {0.0, 1.0}
    # inside the mask the pixels come from the patch, not the image
    assert not torch.equal(out[~outside], images[~outside])


@needs_real_file
def test_identity_pose_lands_on_centred_square(real_set):
    images = torch.rand(2, 3, 224, 224, generator=_gen(3))
    out, masks = apply_patch(
        images, real_set.patches[0], real_set.masks[0], generator=_gen(), rotation=(0, 0), translation=0.0,
        scale=(1, 1), return_masks=True,
    )
    assert torch.equal(masks, real_set.masks[0].expand(2, 1, 224, 224))
    assert torch.equal(out[:, :, 87:137, 87:137], real_set.patches[0, :, 87:137, 87:137].expand(2, 3, 50, 50))
    keep = torch.ones(224, 224, dtype=torch.bool)
    keep[87:137, 87:137] = False
    assert torch.equal(out[:, :, keep], images[:, :, keep])


@needs_real_file
def test_quarter_turn_is_clockwise_rot90(real_set):
    images = torch.rand(1, 3, 224, 224, generator=_gen(4))
    out = apply_patch(images, real_set.patches[1], real_set.masks[1], rotation=(90, 90), translation=0.0, scale=(1, 1))
    square = real_set.patches[1, :, 87:137, 87:137]
    assert torch.equal(out[0, :, 87:137, 87:137], torch.rot90(square, k=-1, dims=(1, 2)))


@needs_real_file
def test_translation_only_moves_square_intact(real_set):
    images = torch.rand(4, 3, 224, 224, generator=_gen(5))
    out, masks = apply_patch(
        images, real_set.patches[3], real_set.masks[3], generator=_gen(6), rotation=(0, 0), translation=0.2,
        scale=(1, 1), return_masks=True,
    )
    for i in range(4):
        rows = masks[i, 0].any(1).nonzero().flatten()
        cols = masks[i, 0].any(0).nonzero().flatten()
        assert len(rows) == 50 and len(cols) == 50 and masks[i].sum() == 2500
        assert abs(rows[0].item() - 87) <= 0.2 * 224 + 1 and abs(cols[0].item() - 87) <= 0.2 * 224 + 1
        r, c = rows[0].item(), cols[0].item()
        assert torch.equal(out[i, :, r : r + 50, c : c + 50], real_set.patches[3, :, 87:137, 87:137])


@needs_real_file
def test_seeded_reproducible_and_one_pose_per_image(real_set):
    image = torch.rand(1, 3, 128, 128, generator=_gen(7))
    images = image.expand(5, -1, -1, -1).clone()
    a, ma = apply_patch(images, real_set.patches[4], real_set.masks[4], generator=_gen(11), return_masks=True)
    b, mb = apply_patch(images, real_set.patches[4], real_set.masks[4], generator=_gen(11), return_masks=True)
    c = apply_patch(images, real_set.patches[4], real_set.masks[4], generator=_gen(12))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(ma[i], ma[j]), f"images {i} and {j} got the same pose"


@needs_real_file
@pytest.mark.parametrize("size", [32, 160])
def test_patch_side_scales_with_image(real_set, size):
    images = torch.rand(3, 3, size, size, generator=_gen(8))
    side = 50 / 224 * size  # 7.1 px at 32, 35.7 px at 160
    _, masks = apply_patch(
        images, real_set.patches[5], real_set.masks[5], rotation=(0, 0), translation=0.0, scale=(1, 1),
        return_masks=True,
    )
    rows = masks[0, 0].any(1).nonzero().flatten()
    assert abs(len(rows) - side) <= 1 and abs(float(masks[0].sum()) - side**2) <= 2 * side + 1
    out, masks = apply_patch(images, real_set.patches[5], real_set.masks[5], generator=_gen(9), return_masks=True)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    areas = masks.sum(dim=(1, 2, 3))
    # scale U(0.7, 1); rotation keeps the area (up to nearest-neighbour edge pixels); translation never pushes
    # the patch off the image
    low, high = (0.7 * side) ** 2 - 4 * 0.7 * side, side**2 + 4 * side
    assert bool((areas >= low).all()) and bool((areas <= high).all())


@needs_real_file
def test_non_square_image_uses_shorter_side(real_set):
    images = torch.rand(1, 3, 112, 224)
    _, masks = apply_patch(
        images, real_set.patches[0], real_set.masks[0], rotation=(0, 0), translation=0.0, scale=(1, 1),
        return_masks=True,
    )
    rows = masks[0, 0].any(1).nonzero().flatten()
    cols = masks[0, 0].any(0).nonzero().flatten()
    # 25 px = 50 / 224 * 112 (nearest sampling at exactly half resolution may round one edge either way)
    assert abs(len(rows) - 25) <= 1 and abs(len(cols) - 25) <= 1


@needs_real_file
def test_patch_applier_matches_apply_patch(real_set):
    applier = PatchApplier(real_set, scale=(0.5, 1.0))
    images = torch.rand(3, 3, 64, 64, generator=_gen(10))
    via_index = applier(images, 7, generator=_gen(13))
    via_tensors = apply_patch(images, real_set.patches[7], real_set.masks[7], generator=_gen(13), scale=(0.5, 1.0))
    explicit = applier(images, real_set.patches[7], real_set.masks[7], generator=_gen(13))
    assert torch.equal(via_index, via_tensors) and torch.equal(explicit, via_tensors)
    with pytest.raises(ValueError, match="out of range"):
        applier(images, 10)
    with pytest.raises(ValueError, match="needs a patch set"):
        PatchApplier()(images, 0)


def test_bad_inputs_raise_value_error():
    patch, mask = torch.rand(3, 16, 16), torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    good = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_patch(good * 255, patch, mask)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_patch(nan, patch, mask)
    with pytest.raises(ValueError, match="3 RGB channels"):
        apply_patch(torch.rand(2, 1, 32, 32), patch, mask)
    with pytest.raises(ValueError, match="canvas"):
        apply_patch(good, patch, mask[:, :8, :8])
    with pytest.raises(ValueError, match="empty"):
        apply_patch(good, patch, torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="scale"):
        apply_patch(good, patch, mask, scale=(0, 1))
    out = apply_patch(good.double(), patch, mask.bool(), generator=_gen())
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_on_cuda_matches_cpu():
    patch, mask = torch.rand(3, 16, 16), torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    images = torch.rand(4, 3, 40, 40)
    cpu = apply_patch(images, patch, mask, generator=_gen(1))
    gpu = apply_patch(images.cuda(), patch.cuda(), mask.cuda(), generator=_gen(1))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------------------------- evaluation


def _toy_set(targets) -> ImageNetPatch:
    """Patch i: channel 0 = 1, channel 1 = (i + 1) / 10, channel 2 = 0 on a centred 8x8 square of a 32 canvas."""
    n = len(targets)
    patches = torch.zeros(n, 3, 32, 32)
    masks = torch.zeros(n, 1, 32, 32)
    for i in range(n):
        patches[i, 0, 12:20, 12:20] = 1.0
        patches[i, 1, 12:20, 12:20] = (i + 1) / 10
    masks[:, :, 12:20, 12:20] = 1
    info = {"patch_size": 8, "patch_type": "square", "input_shape": (3, 32, 32)}
    return ImageNetPatch(patches, masks, torch.tensor(targets), info, [f"t{t}" for t in targets])


def _toy_images(n: int) -> torch.Tensor:
    """Image k: channel 0 = 0, channel 1 = 0.5, channel 2 = (k + 1) / 100 everywhere."""
    images = torch.zeros(n, 3, 48, 48)
    images[:, 1] = 0.5
    images[:, 2] = ((torch.arange(n) + 1) / 100).view(n, 1, 1)
    return images


def _decode(x: torch.Tensor):
    """(image id, patch index or None) of each image, read back from the toy encoding."""
    ids = (x[:, 2].amax(dim=(1, 2)) * 100).round().long() - 1
    patched = x[:, 0].amax(dim=(1, 2)) == 1.0
    on_patch = torch.where(x[:, 0] == 1.0, x[:, 1], torch.zeros_like(x[:, 1]))
    which = (on_patch.amax(dim=(1, 2)) * 10).round().long() - 1
    return ids.tolist(), [int(w) if p else None for w, p in zip(which.tolist(), patched.tolist())]


def test_evaluation_with_label_subset():
    # model labels 0..3 <-> ImageNet [0, 5, 7, 9]; patch targets 5 (label 1), 7 (label 2), 500 (not predictable)
    mapping = [0, 5, 7, 9]
    patch_set = _toy_set([5, 7, 500])
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    fooled = {0: {0, 1, 2}, 1: {3}, 2: {0, 1}}  # per patch: images whose prediction the patch changes
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        ids, which = _decode(x)
        out = []
        for k, p in zip(ids, which):
            if p is None:
                out.append(labels[k].item() if k < 4 else 3)  # clean: images 4, 5 are misclassified
            elif k in fooled[p]:
                out.append({0: 1, 1: 2, 2: (labels[k].item() + 1) % 4}[p])
            else:
                out.append(labels[k].item())
        return torch.tensor(out)

    res = evaluate_imagenet_patch(predict, _toy_images(6), labels, patch_set, label_to_imagenet=mapping,
                                  generator=_gen(0), batch_size=4)
    assert calls == [4, 2] * 4  # clean + 3 patches, batched
    assert res["n_images"] == 6 and res["n_patches"] == 3
    assert res["clean_accuracy"] == pytest.approx(4 / 6)
    p0, p1, p2 = res["per_patch"]
    # patch 0 -> label 1 on images 0, 1, 2 (image 1's label is 1: still correct and a targeted hit)
    assert p0["robust_accuracy"] == pytest.approx(4 / 6)
    assert p0["targeted_success_rate"] == pytest.approx(3 / 6 + 1 / 6)  # images 0, 1, 2 and image 5 (label 1)
    assert p0["target_label"] == 1 and p0["target_in_label_set"] is True
    # patch 1 -> label 2 on image 3; image 2 (label 2) is a hit too
    assert p1["robust_accuracy"] == pytest.approx(5 / 6)
    assert p1["targeted_success_rate"] == pytest.approx(2 / 6)
    # patch 2: target 500 is outside the model's label set
    assert p2["target_in_label_set"] is False and p2["target_label"] is None
    assert p2["targeted_success_rate"] is None
    assert p2["robust_accuracy"] == pytest.approx(4 / 6)
    assert res["robust_accuracy"] == pytest.approx((4 / 6 + 5 / 6 + 4 / 6) / 3)
    assert res["targeted_success_rate"] == pytest.approx((4 / 6 + 2 / 6) / 2)
    assert res["n_patches_target_in_label_set"] == 2


def test_evaluation_without_mapping_uses_imagenet_labels():
    patch_set = _toy_set([804, 513])
    labels = torch.tensor([10, 20, 30, 40])

    def predict(x):
        ids, which = _decode(x)
        return torch.tensor([patch_set.targets[p].item() if p is not None and k % 2 == 0 else labels[k].item()
                             for k, p in zip(ids, which)])

    res = evaluate_imagenet_patch(predict, _toy_images(4), labels, patch_set, batch_size=64)
    assert res["clean_accuracy"] == 1.0
    assert [p["targeted_success_rate"] for p in res["per_patch"]] == [0.5, 0.5]
    assert [p["robust_accuracy"] for p in res["per_patch"]] == [0.5, 0.5]
    assert res["targeted_success_rate"] == 0.5 and res["robust_accuracy"] == 0.5
    # default generator is seeded: the evaluation is reproducible
    again = evaluate_imagenet_patch(predict, _toy_images(4), labels, patch_set)
    assert again == res


def test_imagenette_mapping_makes_every_real_target_unpredictable():
    assert not set(IMAGENET_PATCH_TARGETS) & set(IMAGENETTE_CLASS_INDICES)
    patch_set = _toy_set(list(IMAGENET_PATCH_TARGETS[:2]))
    labels = torch.tensor([0, 1])
    res = evaluate_imagenet_patch(lambda x: torch.zeros(x.shape[0], dtype=torch.long), _toy_images(2), labels,
                                  patch_set, label_to_imagenet=IMAGENETTE_CLASS_INDICES)
    assert res["targeted_success_rate"] is None and res["n_patches_target_in_label_set"] == 0
    assert all(p["target_in_label_set"] is False for p in res["per_patch"])
    assert res["robust_accuracy"] == 0.5


def test_evaluation_rejects_logits():
    patch_set = _toy_set([5])
    with pytest.raises(ValueError, match="argmax"):
        evaluate_imagenet_patch(lambda x: torch.zeros(x.shape[0], 4), _toy_images(2), torch.tensor([0, 1]), patch_set)
