"""The streaming data path (bagcert.streaming): same pixels as the in-memory path, seeded shards, exact resume."""

import numpy as np
import pytest
import torch
from PIL import Image

from bagcert.data import CIFAR10_CLASSES, DatasetError, load_dataset, load_image_folder, synthetic_dataset
from bagcert.streaming import (
    ImageFolderStream,
    ShardedBatchSampler,
    TensorStream,
    choose_data_path,
    decoded_size_bytes,
    epoch_order,
    make_loader,
    open_stream,
)


def _image(rng, h, w, mode):
    small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)  # smooth, so JPEG keeps structure
    return im if mode == "RGB" else im.convert(mode)


@pytest.fixture
def folder(tmp_path):
    """<root>/train/<class>/<image>: 9 images of mixed sizes, formats and colour modes."""
    rng = np.random.default_rng(0)
    specs = {
        "ant": [(40, 56, "RGB", "jpg"), (64, 48, "L", "png"), (37, 50, "RGB", "png")],
        "bee": [(50, 50, "RGBA", "png"), (45, 70, "RGB", "jpg"), (36, 36, "P", "png")],
        "cat": [(60, 41, "L", "jpg"), (48, 64, "RGB", "jpeg"), (39, 52, "RGB", "webp")],
    }
    for c, items in specs.items():
        d = tmp_path / "train" / c
        d.mkdir(parents=True)
        for k, (h, w, mode, ext) in enumerate(items):
            _image(rng, h, w, mode).save(d / f"{k:02d}.{ext}")
        (d / "notes.txt").write_text("not an image")
    return tmp_path


def _epoch(loader):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def test_folder_stream_equals_in_memory_path(folder):
    mem = load_image_folder(folder, size=32, resize=36, split="train", cache=False)
    ds = ImageFolderStream(folder, "train", size=32, resize=36)
    assert ds.classes == mem.classes == ["ant", "bee", "cat"]
    assert torch.equal(ds.labels, mem.labels)
    assert [ds.source(i) for i in range(len(ds))] == mem.sources
    assert ds.image_shape == (3, 32, 32) and ds.decoded_bytes == mem.images.numel()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and torch.equal(x, mem.images[i]) and y == int(mem.labels[i])
    # through the loader (evaluation: dataset order, no augmentation), split over two processes
    got = {}
    for rank in (0, 1):
        for x, y, idx in make_loader(ds, 4, train=False, rank=rank, world=2):
            for k in range(len(idx)):
                got[int(idx[k])] = (x[k], int(y[k]))
    assert sorted(got) == list(range(len(ds)))
    assert all(torch.equal(got[i][0], mem.images[i]) and got[i][1] == int(mem.labels[i]) for i in got)


def test_open_stream_cifar_folder_matches_load_dataset(tmp_path):
    rng = np.random.default_rng(1)
    for c in CIFAR10_CLASSES:
        (tmp_path / "test" / c).mkdir(parents=True)
        for k in range(2):
            _image(rng, 32, 32, "RGB").save(tmp_path / "test" / c / f"{k:04d}.jpg", quality=75)
    mem = load_dataset(str(tmp_path), "test", cache=False)
    ds = open_stream(str(tmp_path), "test")
    assert isinstance(ds, ImageFolderStream) and ds.name == mem.name and ds.classes == mem.classes
    assert ds.augment == "pad-crop" and ds.image_shape == (3, 32, 32)
    assert torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), mem.images)
    assert torch.equal(ds.labels, mem.labels)


def test_shards_are_disjoint_cover_the_epoch_and_are_pure(tmp_path):
    # world 2, n divisible: every index exactly once per epoch, and global batch k = the ranks' batches k
    n, B = 10, 4
    shards = [ShardedBatchSampler(n, B, seed=5, epoch=3, rank=r, world=2).index_batches() for r in (0, 1)]
    order = epoch_order(n, 5, 3)
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(i for s in shards for b in s for i in b) == list(range(n))
    for k in range(3):
        assert sorted(shards[0][k] + shards[1][k]) == sorted(order[k * B:(k + 1) * B].tolist())
    for r in (0, 1):  # DistributedSampler's layout: rank r holds order[r::world]
        assert [i for b in shards[r] for i in b] == order[r::2].tolist()
    # a pure function of (seed, epoch, rank, world): rebuilt, the same; another epoch, another order
    assert ShardedBatchSampler(n, B, seed=5, epoch=3, rank=1, world=2).index_batches() == shards[1]
    assert ShardedBatchSampler(n, B, seed=5, epoch=4, rank=1, world=2).index_batches() != shards[1]
    # n = 11 odd, shuffled: padded with the order's first entry, seen twice; both ranks run as many batches
    odd = [ShardedBatchSampler(11, B, seed=5, epoch=0, rank=r, world=2).index_batches() for r in (0, 1)]
    flat = [i for s in odd for b in s for i in b]
    assert len(odd[0]) == len(odd[1]) and sorted(set(flat)) == list(range(11)) and len(flat) == 12
    assert [i for i in range(11) if flat.count(i) == 2] == [int(epoch_order(11, 5, 0)[0])]
    # evaluation (no shuffle): nothing padded, every index exactly once
    ev = [ShardedBatchSampler(11, B, shuffle=False, rank=r, world=2).index_batches() for r in (0, 1)]
    assert sorted(i for s in ev for b in s for i in b) == list(range(11))
    # drop_last: n // B full global batches, as the in-memory training loop
    dl = ShardedBatchSampler(11, B, seed=5, drop_last=True, rank=0, world=2)
    assert len(dl) == 2 and all(len(b) == 2 for b in dl.index_batches())


def test_resume_continues_the_epoch_exactly():
    ds = TensorStream(synthetic_dataset(22, 3, 16, seed=0))
    before = torch.get_rng_state()
    full = _epoch(make_loader(ds, 4, train=True, seed=3, epoch=2))
    resumed = _epoch(make_loader(ds, 4, train=True, seed=3, epoch=2, start_batch=3))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # the augmentation is real (pad-crop + flip changes images) and differs between epochs
    x, _, idx = full[0]
    assert not torch.equal(x, ds.data.images[idx])
    other = _epoch(make_loader(ds, 22, train=True, seed=3, epoch=3))[0]
    i0 = int(idx[0])
    assert not torch.equal(x[0], other[0][(other[2] == i0).nonzero().item()])


def test_augmentation_does_not_depend_on_world_size():
    ds = TensorStream(synthetic_dataset(12, 3, 16, seed=1))
    one = {int(i): img for x, _, idx in make_loader(ds, 4, train=True, seed=7, epoch=1) for i, img in zip(idx, x)}
    two = {}
    for r in (0, 1):
        for x, _, idx in make_loader(ds, 4, train=True, seed=7, epoch=1, rank=r, world=2):
            two.update({int(i): img for i, img in zip(idx, x)})
    assert sorted(one) == sorted(two) == list(range(12))
    assert all(torch.equal(one[i], two[i]) for i in one)


def test_two_workers_match_in_process_and_resume(folder):
    ds = ImageFolderStream(folder, "train", size=24, resize=28)  # augment auto: RandomResizedCrop + flip
    assert ds.augment == "resized-crop"
    ref = _epoch(make_loader(ds, 3, train=True, seed=1, epoch=0, workers=0))
    loader = make_loader(ds, 3, train=True, seed=1, epoch=0, start_batch=1, workers=2)
    got = _epoch(loader)
    assert len(got) == 2 and all(x.shape == (3, 3, 24, 24) and x.dtype == torch.uint8 for x, _, _ in got)
    for a, b in zip(ref[1:], got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # the persistent workers move on to the next epoch: same batches as a fresh loader of that epoch
    loader.batch_sampler.set_epoch(1)
    nxt = _epoch(loader)
    fresh = _epoch(make_loader(ds, 3, train=True, seed=1, epoch=1, workers=0))
    assert len(nxt) == 3 and all(torch.equal(u, v) for a, b in zip(nxt, fresh) for u, v in zip(a, b))


@pytest.mark.parametrize("name, data", [("broken.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 40), ("broken.png", b"garbage bytes")], ids=["jpeg", "png"])
def test_bad_file_raises_dataset_error_naming_it(folder, name, data):
    (folder / "train" / "bee" / name).write_bytes(data)
    ds = ImageFolderStream(folder, "train", size=32, resize=36)
    k = [ds.source(i) for i in range(len(ds))].index(f"bee/{name}")
    with pytest.raises(DatasetError, match=name):
        ds[k]
    with pytest.raises(DatasetError, match=name):
        ds.train_item(k, seed=0)
    with pytest.raises(DatasetError, match=name):
        _epoch(make_loader(ds, len(ds), train=False))


def test_folder_errors(tmp_path, folder):
    with pytest.raises(DatasetError, match="not found"):
        ImageFolderStream(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="split folders"):
        ImageFolderStream(folder)  # <root>/train/<class>: the split must be named
    with pytest.raises(DatasetError, match="no split folder 'val'"):
        ImageFolderStream(folder, "val")
    with pytest.raises(ValueError, match="resize"):
        ImageFolderStream(folder, "train", size=32, resize=30)
    ds = ImageFolderStream(folder, "train", size=None)  # stored size: the images here differ in size
    assert ds.image_shape == (3, 40, 56)
    with pytest.raises(DatasetError, match="01.png has size 48x64"):
        ds[1]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        make_loader(ds, 3, train=True, world=2)
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(ds, 4, train=True, start_batch=4)


def test_choose_data_path():
    imagenet = decoded_size_bytes(1_281_167, 224)
    assert imagenet == 1_281_167 * 3 * 224 * 224
    path, reason = choose_data_path(imagenet, budget_bytes=32 * 10**9)
    assert path == "stream" and "192.9 GB" in reason and "exceeds" in reason
    path, reason = choose_data_path(decoded_size_bytes(50_000, 32), budget_bytes=32 * 10**9)
    assert path == "memory" and "153.6 MB" in reason
    assert choose_data_path(100, 100, "auto")[0] == "memory" and choose_data_path(101, 100)[0] == "stream"
    assert choose_data_path(60, 100, copies=2)[0] == "stream"  # each local process holds a copy
    assert choose_data_path(10, 100, "stream") == ("stream", "stream: forced (10 B decoded, within the budget 100 B)")
    path, reason = choose_data_path(101, 100, "memory")
    assert path == "memory" and "OVER" in reason
    path, reason = choose_data_path(1)  # default budget: a share of this machine's available memory
    assert path == "memory" and "available memory" in reason
    with pytest.raises(ValueError, match="auto, memory or stream"):
        choose_data_path(1, 10, "disk")


def test_benchmark_writes_a_seeded_imagenet_like_folder(tmp_path):
    from conftest import load_benchmark

    bench = load_benchmark("data_path")
    a = bench.write_imagenet_like_folder(tmp_path / "a", 4, classes=2, seed=3)
    b = bench.write_imagenet_like_folder(tmp_path / "b", 4, classes=2, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert [str(f) for f in files] == ["n0000000/img_000000.JPEG", "n0000000/img_000002.JPEG",
                                      "n0000001/img_000001.JPEG", "n0000001/img_000003.JPEG"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    ds = ImageFolderStream(a, size=224)
    assert len(ds) == 4 and ds.classes == ["n0000000", "n0000001"]
    sizes = [Image.open(a / f).size for f in files]
    assert all(300 <= min(wh) and max(wh) <= 500 for wh in sizes) and len(set(sizes)) == 4
    assert ds[3][0].shape == (3, 224, 224)
