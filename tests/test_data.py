import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bagcert.data import DatasetError, augment_batch, load_cifar10, load_dataset, load_image_folder, seeded_split, synthetic_dataset
from conftest import ROOT, SHARED


def _write_cifar_batches(root, n=20):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    return root


def test_torchvision_layout(tmp_path):
    root = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    train = load_cifar10(tmp_path, "train")
    test = load_cifar10(root, "test")
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32)
    with open(root / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(test.images[3].flatten(), torch.from_numpy(raw[b"data"][3]))


def test_cifar_batch_with_foreign_object_is_refused(tmp_path):
    root = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": eval, b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_cifar10(root, "test")


def test_bundled_samples_image_folder():
    ds = load_cifar10(ROOT / "samples" / "cifar10", "test")
    assert len(ds) == 200 and ds.images.shape[1:] == (3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    assert ds.name == "CIFAR-10 (JPEG q75 copy)"
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 20))


def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "nope", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected one of those layouts"):
        load_cifar10(tmp_path / "empty", "test")
    with pytest.raises(DatasetError, match="ImageFolder layout"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="class sub-folders"):
        load_image_folder(tmp_path / "empty")


def test_image_folder_resize_and_crop(tmp_path):
    for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for k, size in enumerate([(80, 60), (60, 90)]):
            Image.new("RGB", size, colour).save(tmp_path / c / f"{k}.png")
    ds = load_image_folder(tmp_path, size=40, resize=48)
    assert ds.images.shape == (4, 3, 40, 40)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images[0, 0].float().mean() == 255 and ds.images[2, 2].float().mean() == 255


def test_load_dataset_dispatch():
    ds = load_dataset("synthetic:16", "test", num_classes=3)
    assert len(ds) == 16 and ds.labels.max() < 3
    ds = load_dataset(str(ROOT / "samples" / "cifar10"), "test")
    assert len(ds) == 200


def test_seeded_split_is_reproducible_and_disjoint():
    a_tr, a_te = seeded_split(100, 0.2, seed=3)
    b_tr, b_te = seeded_split(100, 0.2, seed=3)
    assert torch.equal(a_tr, b_tr) and torch.equal(a_te, b_te)
    assert len(a_te) == 20 and len(set(a_tr.tolist()) & set(a_te.tolist())) == 0
    assert sorted(a_tr.tolist() + a_te.tolist()) == list(range(100))


def test_augment_batch_is_seeded_and_shape_preserving():
    ds = synthetic_dataset(8)
    a = augment_batch(ds.images, torch.Generator().manual_seed(0), pad=4, cutout=8)
    b = augment_batch(ds.images, torch.Generator().manual_seed(0), pad=4, cutout=8)
    assert torch.equal(a, b) and a.shape == ds.images.shape and a.dtype == torch.uint8
    # with no flip and no padding the batch is unchanged
    same = augment_batch(ds.images, torch.Generator().manual_seed(0), flip=False, pad=0)
    assert torch.equal(same, ds.images)


def test_pad_crop_is_a_shift():
    x = torch.arange(2 * 1 * 6 * 6).view(2, 1, 6, 6).float()
    y = augment_batch(x, torch.Generator().manual_seed(1), flip=False, pad=2)
    for b in range(2):
        padded = torch.nn.functional.pad(x[b : b + 1], (2, 2, 2, 2))[0, 0]
        windows = [padded[i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(y[b, 0], w) for w in windows)


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="shared CIFAR-10 copy not present")
def test_shared_cifar10_counts():
    ds = load_cifar10(SHARED / "cifar10", "test")
    assert len(ds) == 10_000 and torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))


def test_augment_batch_random_crop_is_a_window_of_the_input():
    from bagcert.data import augment_batch

    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(3), flip=False, pad=0, crop=16)
    again = augment_batch(x, torch.Generator().manual_seed(3), flip=False, pad=0, crop=16)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.uint8 and torch.equal(out, again)
    offsets = set()
    for i in range(6):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], x[i, :, dy:dy + 16, dx:dx + 16])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1  # the offsets are random, not always the centre
    # crop with flips: every output is a window of the image or of its mirror
    out = augment_batch(x, torch.Generator().manual_seed(4), flip=True, pad=0, crop=16)
    for i in range(6):
        assert any(torch.equal(out[i], src[:, dy:dy + 16, dx:dx + 16]) for src in (x[i], x[i].flip(2)) for dy in range(5) for dx in range(5))
    # crop=None keeps the classic pad-and-crop draws (same output as before the option existed)
    a = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    b = augment_batch(x, torch.Generator().manual_seed(5), pad=2, crop=20)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="crop 30"):
        augment_batch(x, torch.Generator().manual_seed(0), pad=0, crop=30)


# --- the checkpoint's seeded split ---------------------------------------------------------------
def _wnid_folder(root, classes=("n01440764", "n02102040"), per_class=5):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    return root


def test_load_checkpoint_split_cuts_a_folder_with_the_recorded_split(tmp_path):
    from bagcert.data import load_checkpoint_split

    root = _wnid_folder(tmp_path / "f")
    record = {"seed": 3, "test_fraction": 0.3, "num_images": 10}
    whole = load_checkpoint_split(str(root), "all", record, size=8, resize=8)
    test = load_checkpoint_split(str(root), "test", record, size=8, resize=8)
    train = load_checkpoint_split(str(root), "train", record, size=8, resize=8)
    tr, te = seeded_split(10, 0.3, 3)
    assert (len(whole), len(test), len(train)) == (10, 3, 7)
    assert torch.equal(test.images, whole.images[te]) and torch.equal(train.labels, whole.labels[tr])
    assert (whole.info["split"], test.info["split"], train.info["split"]) == ("all", "test", "train")
    assert test.info["seeded_split"] == record
    # a folder of another size is not the training folder: it has no test part
    other = _wnid_folder(tmp_path / "g", per_class=4)
    with pytest.raises(DatasetError, match="8 images but the checkpoint's seeded split was made over 10"):
        load_checkpoint_split(str(other), "test", record, size=8, resize=8)
    with pytest.raises(DatasetError, match="test, train or all"):
        load_checkpoint_split(str(root), "val", record, size=8, resize=8)
    # no record (a model trained elsewhere): its test images cannot be told from its training images
    with pytest.raises(DatasetError, match="records no seeded split"):
        load_checkpoint_split(str(other), "test", None, size=8, resize=8)
    assert load_checkpoint_split(str(other), "all", None, size=8, resize=8).info["split"] == "all"


def test_load_checkpoint_split_keeps_split_folders_and_refuses_all_there(tmp_path):
    from bagcert.data import load_checkpoint_split

    root = tmp_path / "d"
    _wnid_folder(root / "train", per_class=3)
    _wnid_folder(root / "test", per_class=2)
    record = {"seed": 0, "test_fraction": 0.5, "num_images": 6}  # ignored: the folder has its own splits
    assert len(load_checkpoint_split(str(root), "test", record, size=8, resize=8)) == 4
    assert len(load_checkpoint_split(str(root), "train", record, size=8, resize=8)) == 6
    with pytest.raises(DatasetError, match="split folders"):
        load_checkpoint_split(str(root), "all", record, size=8, resize=8)
