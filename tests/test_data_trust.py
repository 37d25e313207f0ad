"""Datasets that can be trusted: the decode cache follows the files, bad files are named, odd pixel formats follow
one rule, --train-limit draws every class, every image keeps its provenance, and splits are never widened silently."""

import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import bagcert.data as D
from bagcert.data import DatasetError, load_checkpoint_split, load_cifar10, load_dataset, load_image_folder, seeded_split


def _rgb(seed, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _cifar_like(root, classes=("a", "b", "c"), per_class=2):
    """<root>/test/<class>/<k>.png with distinct random 32x32 pictures; returns the split folder."""
    folder = root / "test"
    for i, c in enumerate(classes):
        (folder / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(_rgb(100 * i + k)).save(folder / c / f"{k}.png")
    return folder


def _expected(folder):
    """Pixels [N, 3, 32, 32] and labels decoded straight from the files, in class-then-name order."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels, sources = [], [], []
    for i, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            with Image.open(f) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            labels.append(i)
            sources.append(f"{c}/{f.name}")
    return torch.stack(images), torch.tensor(labels), sources


def _cache_entries():
    return sorted(D.cache_dir().glob("*.pt"))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test has its own decode cache folder."""
    monkeypatch.setenv("BAGCERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BAGCERT_NO_CACHE", raising=False)


# --- the decode cache follows the files -----------------------------------------------------------------------
def test_cache_follows_added_removed_and_overwritten_files(tmp_path):
    folder = _cifar_like(tmp_path / "c10")
    first = load_cifar10(tmp_path / "c10", "test")
    assert len(_cache_entries()) == 1
    images, labels, sources = _expected(folder)
    assert torch.equal(first.images, images) and torch.equal(first.labels, labels) and first.sources == sources
    Image.fromarray(_rgb(7)).save(folder / "a" / "2.png")  # added
    (folder / "b" / "0.png").unlink()  # removed
    Image.fromarray(_rgb(8)).save(folder / "c" / "1.png")  # overwritten with another picture of the same size
    second = load_cifar10(tmp_path / "c10", "test")
    images, labels, sources = _expected(folder)
    assert len(second) == 6 and second.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.equal(second.images, images) and torch.equal(second.labels, labels) and second.sources == sources
    assert len(_cache_entries()) == 1  # the stale entry is replaced, not kept beside the new one
    # the ImageNet-style loader has its own entries and follows the files the same way
    whole = load_image_folder(folder, size=32, resize=32)
    Image.fromarray(_rgb(9)).save(folder / "a" / "0.png")
    again = load_image_folder(folder, size=32, resize=32)
    assert not torch.equal(again.images[0], whole.images[0]) and torch.equal(again.images[0], _expected(folder)[0][0])


def test_cache_notices_an_overwrite_with_the_same_size_and_mtime(tmp_path):
    folder = _cifar_like(tmp_path / "c10", per_class=1)
    for f in list(folder.rglob("*.png")):  # BMP files of one shape all have the same byte size
        Image.open(f).save(f.with_suffix(".bmp"))
        f.unlink()
    target = folder / "b" / "0.bmp"
    before = load_cifar10(tmp_path / "c10", "test")
    st = target.stat()
    Image.fromarray(_rgb(42)).save(target, format="BMP")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = load_cifar10(tmp_path / "c10", "test")
    assert torch.equal(after.images[1], torch.from_numpy(_rgb(42)).permute(2, 0, 1))
    assert not torch.equal(after.images[1], before.images[1]) and torch.equal(after.images[0], before.images[0])


def test_cache_hashes_recent_files_when_their_stat_looks_unchanged(tmp_path, monkeypatch):
    """A file rewritten within the file system's clock step keeps size, mtime and ctime: its bytes decide."""
    folder = _cifar_like(tmp_path / "c10", per_class=1)
    first = load_cifar10(tmp_path / "c10", "test")
    real = D._list_image_folder
    frozen = real(folder).stats

    def same_stats(root):
        listing = real(root)
        listing.stats = list(frozen)  # every file reports the stat it had when the entry was written
        return listing

    monkeypatch.setattr(D, "_list_image_folder", same_stats)
    Image.fromarray(_rgb(5)).save(folder / "c" / "0.png")
    after = load_cifar10(tmp_path / "c10", "test")
    assert torch.equal(after.images[2], torch.from_numpy(_rgb(5)).permute(2, 0, 1))
    assert torch.equal(after.images[:2], first.images[:2])


def test_a_cache_hit_decodes_nothing_and_the_bypass_reads_and_writes_nothing(tmp_path, monkeypatch):
    folder = _cifar_like(tmp_path / "c10", per_class=1)
    first = load_cifar10(tmp_path / "c10", "test")
    calls = []
    real = D.decode_image
    monkeypatch.setattr(D, "decode_image", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert torch.equal(load_cifar10(tmp_path / "c10", "test").images, first.images) and calls == []
    entry = _cache_entries()[0]
    entry.write_bytes(b"not this")  # a bypass must not read it...
    for how in ("param", "env"):
        calls.clear()
        if how == "env":
            monkeypatch.setenv("BAGCERT_NO_CACHE", "1")
        data = load_cifar10(tmp_path / "c10", "test", cache=how == "env")  # param: cache=False
        assert torch.equal(data.images, first.images) and len(calls) == 3
        assert entry.read_bytes() == b"not this" and _cache_entries() == [entry]  # ...nor write one
    monkeypatch.setenv("BAGCERT_NO_CACHE", "maybe")
    with pytest.raises(DatasetError, match="BAGCERT_NO_CACHE must be 1"):
        load_cifar10(tmp_path / "c10", "test")
    assert folder.is_dir()


def test_a_broken_entry_is_rebuilt_and_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    _cifar_like(tmp_path / "c10", per_class=1)
    good = load_cifar10(tmp_path / "c10", "test", cache=False)
    load_cifar10(tmp_path / "c10", "test")
    entry = _cache_entries()[0]
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a half file
    assert torch.equal(load_cifar10(tmp_path / "c10", "test").images, good.images)
    entry.unlink()

    def killed(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.warns(UserWarning, match="not writable"):
        data = load_cifar10(tmp_path / "c10", "test")
    assert torch.equal(data.images, good.images)
    assert list(D.cache_dir().iterdir()) == []  # neither an entry nor a temporary file


# --- bad files are named -------------------------------------------------------------------------------------
def _good_folder(root):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(_rgb(0)).save(root / "a" / "ok.png")
    Image.fromarray(_rgb(1)).save(root / "b" / "ok.png")
    return root


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(_rgb(3)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(_rgb(3)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["empty", "truncated_png", "png_without_iend", "truncated_jpeg", "random_bytes", "text",
                                  "symlink_loop", "dangling_symlink", "directory"])
def test_a_bad_image_file_is_a_dataset_error_naming_it(tmp_path, kind):
    root = _good_folder(tmp_path / "d")
    bad = root / "b" / ("bad.jpg" if "jpeg" in kind else "bad.png")
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated_png":
        bad.write_bytes(_png_bytes()[:300])
    elif kind == "png_without_iend":
        bad.write_bytes(_png_bytes()[:-12])
    elif kind == "truncated_jpeg":
        bad.write_bytes(_jpeg_bytes()[:400])
    elif kind == "random_bytes":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "text":
        bad.write_text("not a picture\n")
    elif kind == "symlink_loop":
        os.symlink(bad.name, bad)
    elif kind == "dangling_symlink":
        os.symlink(root / "nowhere.png", bad)
    else:
        bad.mkdir()
    with pytest.raises(DatasetError, match="bad\\.(png|jpg)") as e:
        load_image_folder(root, size=32, resize=32)
    assert "BytesIO" not in str(e.value) and "\n" not in str(e.value)  # the file, not Pillow's in-memory buffer


def _png(w, h, bit_depth, colour_type, rows):
    """A PNG file from raw big-endian sample rows (filter type 0), written by hand."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + r.tobytes() for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_a_16bit_png_keeps_its_high_byte(tmp_path):
    v = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64 + 63).astype(">u2")  # 63 ... 65535
    (tmp_path / "d" / "gray").mkdir(parents=True)
    (tmp_path / "d" / "gray" / "g.png").write_bytes(_png(32, 32, 16, 0, v))
    (tmp_path / "d" / "rgb").mkdir()
    rgb = np.stack([v, 65535 - v, v // 2], -1).astype(">u2")
    (tmp_path / "d" / "rgb" / "c.png").write_bytes(_png(32, 32, 16, 2, rgb))
    data = load_image_folder(tmp_path / "d", size=32, resize=32)
    high = torch.from_numpy((v.astype(np.int64) >> 8).astype(np.uint8))
    assert data.images[0, 0].max() == 255 and data.images[0, 0].min() == 0
    for ch in range(3):  # grayscale: every channel the high byte
        assert torch.equal(data.images[0, ch], high)
    expected_rgb = torch.from_numpy((rgb.astype(np.int64) >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(data.images[1], expected_rgb)  # 16-bit RGB: the same rule


def test_alpha_palette_gray_and_cmyk_follow_one_rule(tmp_path):
    rgb = _rgb(11, (8, 8))
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:4] = 255  # top half opaque, bottom half fully transparent
    gray = rgb[..., 0]
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 0
    pictures = {
        "rgba": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "la": Image.fromarray(np.dstack([gray, alpha]), "LA"),
        "l": Image.fromarray(gray, "L"),
        "p": pal,
        "cmyk": Image.fromarray(rgb).convert("CMYK"),
    }
    root = tmp_path / "d"
    for name, im in pictures.items():
        (root / name).mkdir(parents=True)
        im.save(root / name / ("x.tif" if name == "cmyk" else "x.png"), **({"transparency": 0} if name == "p" else {}))
    data = load_image_folder(root, size=8, resize=8)
    by_class = {c: data.images[data.classes.index(c)].permute(1, 2, 0).numpy() for c in pictures}
    assert np.array_equal(by_class["rgba"], rgb)  # alpha dropped: the colour under a transparent pixel is kept
    assert np.array_equal(by_class["la"], np.dstack([gray] * 3)) and np.array_equal(by_class["l"], np.dstack([gray] * 3))
    assert np.array_equal(by_class["p"], np.asarray(pal.convert("RGB")))  # palette colours, transparency dropped
    assert np.array_equal(by_class["cmyk"], np.asarray(pictures["cmyk"].convert("RGB")))


def test_32bit_and_float_images_are_refused(tmp_path):
    for mode, arr in (("I", np.full((8, 8), 70000, np.int32)), ("F", np.full((8, 8), 0.5, np.float32))):
        root = tmp_path / mode
        (root / "a").mkdir(parents=True)
        Image.fromarray(arr, mode).save(root / "a" / "x.tif")
        with pytest.raises(DatasetError, match=f"x.tif has pixel mode {mode}"):
            load_image_folder(root, size=8, resize=8)


def test_an_image_smaller_than_the_crop_is_enlarged_never_padded(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("RGB", (10, 6), (200, 30, 90)).save(tmp_path / "d" / "a" / "small.png")
    data = load_image_folder(tmp_path / "d", size=16, resize=16)
    assert data.images.shape == (1, 3, 16, 16)
    assert torch.equal(data.images[0], torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))


# --- --train-limit draws every class --------------------------------------------------------------------------
def _class_sorted(per_class=10, classes=10):
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    return D.Dataset(images, labels, [f"c{i}" for i in range(classes)], "sorted", {},
                     [f"c{y}/{k}.png" for k, y in enumerate(labels.tolist())])


def test_stratified_subset_is_balanced_seeded_and_keeps_provenance():
    data = _class_sorted()
    a = D.stratified_subset(data, 20, seed=0)
    assert torch.bincount(a.labels, minlength=10).tolist() == [2] * 10
    assert torch.equal(a.indices, a.indices.sort().values) and a.sources == [data.sources[i] for i in a.indices.tolist()]
    assert torch.equal(a.images[:, 0, 0, 0].long(), a.indices)  # the pixels of the drawn images
    assert torch.equal(D.stratified_subset(data, 20, seed=0).indices, a.indices)
    assert not torch.equal(D.stratified_subset(data, 20, seed=1).indices, a.indices)
    assert a.info["stratified_subset"]["per_class"] == {f"c{i}": 2 for i in range(10)}
    # uneven classes: a small class gives all it has, the others share the rest as evenly as possible
    uneven = data.subset(torch.cat([torch.arange(0, 1), torch.arange(10, 100)]))  # class 0 keeps one image
    b = D.stratified_subset(uneven, 23, seed=4)
    counts = torch.bincount(b.labels, minlength=10).tolist()
    assert sum(counts) == 23 and counts[0] == 1 and max(counts[1:]) - min(counts[1:]) <= 1
    assert torch.equal(b.indices, uneven.indices[torch.isin(uneven.indices, b.indices)])  # full-dataset indices
    assert D.stratified_subset(data, 1000, seed=0) is data
    with pytest.raises(ValueError, match=">= 1"):
        D.stratified_subset(data, 0, seed=0)


def test_train_limit_takes_a_stratified_draw(tmp_path, monkeypatch, capsys):
    import bagcert.cli.train as train_cli
    import bagcert.runs.train as train_run  # the run loads the data and calls the loop it imported

    root = tmp_path / "sorted"
    for i in range(10):
        (root / f"class{i}").mkdir(parents=True)
        for k in range(5):
            Image.fromarray(_rgb(10 * i + k)).save(root / f"class{i}" / f"{k}.png")
    seen = {}

    def fake_train(cfg, train_data, eval_data, resume=False, **kwargs):
        seen["train"], seen["eval"] = train_data, eval_data
        return {"steps": 0}

    monkeypatch.setattr(train_run, "train", fake_train)
    argv = ["--dataset", str(root), "--image-size", "32", "--resize", "32", "--train-limit", "10", "--seed", "3",
            "--output", str(tmp_path / "run"), "--no-progress", "--no-tensorboard"]
    assert train_cli.main(argv) == 0
    got = seen["train"]
    assert len(got) == 10 and torch.bincount(got.labels, minlength=10).tolist() == [1] * 10
    assert "seeded_split" in got.info  # the split record still reaches the checkpoint
    assert not set(got.indices.tolist()) & set(seen["eval"].indices.tolist())  # never a held-out image
    assert "--train-limit 10" in capsys.readouterr().err


# --- provenance -------------------------------------------------------------------------------------------------
def test_every_image_keeps_its_source_and_index(tmp_path):
    folder = _cifar_like(tmp_path / "c10", per_class=3)
    whole = load_checkpoint_split(str(folder), "all", None, size=32, resize=32)
    assert whole.sources == _expected(folder)[2] and torch.equal(whole.indices, torch.arange(9))
    record = {"seed": 5, "test_fraction": 0.4, "num_images": 9}
    tr, te = seeded_split(9, 0.4, 5)
    test = load_checkpoint_split(str(folder), "test", record, size=32, resize=32)
    assert torch.equal(test.indices, te) and test.sources == [whole.sources[i] for i in te.tolist()]
    part = test.subset([2, 0])
    assert part.indices.tolist() == [te[2].item(), te[0].item()] and part.sources == [test.sources[2], test.sources[0]]
    assert torch.equal(part.images, whole.images[part.indices])
    # CIFAR batches: the batch file and row; the index is torchvision's
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, f)
    train = load_cifar10(batches, "train")
    assert train.sources[:4] == ["data_batch_1:0", "data_batch_1:1", "data_batch_1:2", "data_batch_2:0"]
    assert train.subset([14]).sources == ["data_batch_5:2"] and train.subset([14]).indices.tolist() == [14]
    synth = load_dataset("synthetic:6", "test")
    assert synth.sources is None and torch.equal(synth.subset([4, 1]).indices, torch.tensor([4, 1]))


# --- splits -------------------------------------------------------------------------------------------------------
def test_a_folder_without_a_split_record_is_not_widened(tmp_path, tiny_checkpoint):
    import certify

    folder = _cifar_like(tmp_path / "c10", classes=[f"class{i}" for i in range(10)], per_class=1)
    for split in ("test", "train"):
        with pytest.raises(DatasetError, match="records no seeded split.*cannot be told from the images it was trained on"):
            load_checkpoint_split(str(folder), split, None, size=32, resize=32)
    assert load_checkpoint_split(str(folder), "all", None, size=32, resize=32).info["split"] == "all"
    with pytest.raises(SystemExit, match="--split test: .*records no seeded split.*split 'all'"):
        certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", str(folder), "--output", str(tmp_path / "o")])


def test_a_missing_split_folder_names_the_ones_that_exist(tmp_path):
    root = tmp_path / "d"
    _good_folder(root / "train")
    _good_folder(root / "test")
    for load in (lambda: load_checkpoint_split(str(root), "val", None, size=32, resize=32),
                 lambda: load_dataset(str(root), "val", size=32, resize=32),
                 lambda: load_image_folder(root, size=32, resize=32, split="val")):
        with pytest.raises(DatasetError, match="has no split folder 'val'; its split folders are: test, train"):
            load()
    with pytest.raises(DatasetError, match="split folders \\(test, train\\), not class folders"):
        load_image_folder(root, size=32, resize=32)
    with pytest.raises(DatasetError, match="no split folder 'test'; its split folders are: train"):
        load_dataset(str(_good_folder(tmp_path / "only" / "train").parent), "test", size=32, resize=32)
    with pytest.raises(DatasetError, match="'train' and 'test', got 'val'"):
        load_cifar10(tmp_path, "val")


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:-4", "synthetic:many"])
def test_a_synthetic_size_below_one_is_refused(spec):
    with pytest.raises(DatasetError, match="integer >= 1"):
        load_dataset(spec, "test")
    with pytest.raises(DatasetError, match="integer >= 1"):
        load_checkpoint_split(spec, "test", None)
