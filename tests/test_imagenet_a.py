"""Tests for bagcert.imagenet_a.

The real ImageNet-A images are not available in this environment: every test builds a small
synthetic folder with the same ``<wnid>/<image>`` layout (tiny PNG/JPEG files made with PIL) or
uses in-memory tensors, with fake logits functions whose argmax is controlled.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bagcert import metrics
from bagcert.data import DatasetError
from bagcert.imagenet_a import (
    IMAGENET_A_INDICES,
    evaluate_imagenet_a,
    evaluate_subset_model,
    load_imagenet_a,
)

WNIDS3 = ["n01498041", "n01531178", "n01534433"]  # sorted
# a synthetic subset: the three folders are ImageNet-A classes 0, 5 and 199 (positions in the 200 list)
INDICES3 = {WNIDS3[0]: IMAGENET_A_INDICES[0], WNIDS3[1]: IMAGENET_A_INDICES[5], WNIDS3[2]: IMAGENET_A_INDICES[199]}


def _save(path, array, fmt):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt)


def _make_subset_folder(root):
    """3 wnid folders, 4 images: 2 PNG in the first, 1 JPEG in the second, 1 PNG in the third."""
    root.mkdir()
    for w in WNIDS3:
        (root / w).mkdir()
    # 20 wide x 10 high, left half red, right half blue: shorter side is already 10, so with
    # resize=10 nothing is resized and the 8x8 centre crop spans columns 6..13 (6..9 red, 10..13 blue)
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10, 0] = 255
    img[:, 10:, 2] = 255
    _save(root / WNIDS3[0] / "a.png", img, "PNG")
    _save(root / WNIDS3[0] / "b.png", np.full((16, 12, 3), 40), "PNG")
    _save(root / WNIDS3[1] / "c.jpg", np.full((12, 12, 3), 128), "JPEG")
    _save(root / WNIDS3[2] / "d.png", np.full((30, 10, 3), 200), "PNG")
    (root / WNIDS3[2] / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("files at the top level are ignored")
    return root


def test_indices_constant():
    assert len(IMAGENET_A_INDICES) == 200
    assert all(a < b for a, b in zip(IMAGENET_A_INDICES, IMAGENET_A_INDICES[1:]))
    assert IMAGENET_A_INDICES[:5] == (6, 11, 13, 15, 17)
    assert IMAGENET_A_INDICES[-5:] == (981, 984, 986, 987, 988)
    assert sum(IMAGENET_A_INDICES) == 102178  # checksum of the list in docs/reference.md section 6
    assert isinstance(IMAGENET_A_INDICES, tuple)


def test_load_subset_labels_shapes_and_crop(tmp_path):
    root = _make_subset_folder(tmp_path / "imagenet-a")
    images, labels, wnids = load_imagenet_a(root, size=8, resize=10, allow_subset=True, indices=INDICES3)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.dtype == torch.long
    # labels are positions among the 200 ImageNet-A classes, files sorted within each folder
    assert labels.tolist() == [0, 0, 5, 199]
    assert len(wnids) == 200
    assert wnids[0] == WNIDS3[0] and wnids[5] == WNIDS3[1] and wnids[199] == WNIDS3[2]
    assert sum(w is not None for w in wnids) == 3
    # centre crop of the red|blue image: columns 0..3 red, 4..7 blue
    a = images[0]
    assert (a[0, :, :4] == 255).all() and (a[2, :, :4] == 0).all()
    assert (a[2, :, 4:] == 255).all() and (a[0, :, 4:] == 0).all()
    assert (images[1] == 40).all() and (images[3] == 200).all()
    assert (images[2].int() - 128).abs().max() <= 3  # JPEG


def test_load_subset_with_full_wnid_list(tmp_path):
    root = _make_subset_folder(tmp_path / "imagenet-a")
    full = sorted([f"n0{k:07d}" for k in range(197)] + WNIDS3)  # a made-up 200-wnid list
    res = load_imagenet_a(root, size=8, resize=10, wnids=full, allow_subset=True)
    assert res.labels.tolist() == [full.index(WNIDS3[0])] * 2 + [full.index(WNIDS3[1]), full.index(WNIDS3[2])]
    assert res.wnids == full


def test_load_full_200_folders_in_sorted_order(tmp_path):
    root = tmp_path / "imagenet-a"
    root.mkdir()
    wnids = [f"n{10000000 + 7 * j:08d}" for j in range(200)]
    for j, w in enumerate(reversed(wnids)):  # creation order must not matter
        (root / w).mkdir()
        _save(root / w / "x.png", np.full((4, 4, 3), j), "PNG")
    images, labels, got = load_imagenet_a(root, size=4, resize=4)
    assert images.shape == (200, 3, 4, 4)
    assert labels.tolist() == list(range(200))
    assert got == wnids
    # with 200 folders the default mapping needs no wnids/indices; dropping one folder is an error
    import shutil

    shutil.rmtree(root / wnids[7])
    with pytest.raises(DatasetError, match="199 wnid folders"):
        load_imagenet_a(root, size=4, resize=4)


def test_missing_folder_error(tmp_path):
    with pytest.raises(DatasetError, match=r"imagenet-a/<wnid>/<image>") as e:
        load_imagenet_a(tmp_path / "nowhere")
    assert "not found" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_wrong_layout_errors(tmp_path):
    # a parent folder holding imagenet-a/ -> not wnid folders, with a hint
    _make_subset_folder(tmp_path / "imagenet-a")
    with pytest.raises(DatasetError, match="imagenet-a/<wnid>/<image>") as e:
        load_imagenet_a(tmp_path, allow_subset=True, indices=INDICES3)
    assert "did you mean" in str(e.value)
    # class folders with plain names
    other = tmp_path / "cats_dogs"
    (other / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not wnids"):
        load_imagenet_a(other)
    # empty folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_imagenet_a(tmp_path / "empty")
    # wnid folders without images
    bare = tmp_path / "bare"
    (bare / WNIDS3[0]).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_imagenet_a(bare, allow_subset=True, indices=INDICES3)


def test_subset_needs_explicit_permission_and_mapping(tmp_path):
    root = _make_subset_folder(tmp_path / "imagenet-a")
    with pytest.raises(DatasetError, match="allow_subset"):
        load_imagenet_a(root, size=8, resize=10)
    with pytest.raises(ValueError, match="wnids=.*indices="):
        load_imagenet_a(root, size=8, resize=10, allow_subset=True)
    with pytest.raises(DatasetError, match="no 1k index"):
        load_imagenet_a(root, size=8, resize=10, allow_subset=True, indices={WNIDS3[0]: 6})
    bad = dict(INDICES3, **{WNIDS3[1]: 0})  # 1k class 0 is not an ImageNet-A class
    with pytest.raises(DatasetError, match="not ImageNet-A classes"):
        load_imagenet_a(root, size=8, resize=10, allow_subset=True, indices=bad)
    with pytest.raises(ValueError, match="not both"):
        load_imagenet_a(root, allow_subset=True, indices=INDICES3, wnids=["n00000000"] * 200)
    with pytest.raises(ValueError, match="size"):
        load_imagenet_a(root, size=12, resize=10, allow_subset=True, indices=INDICES3)


# --- evaluation -----------------------------------------------------------------------------------


def _id_images(n):
    """uint8 images [n, 3, 4, 4] whose every pixel holds the image's id (0..n-1)."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()


def _ids(x):
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_evaluate_imagenet_a_restricts_to_the_200_columns():
    # image id -> (1k column with the top logit among the 200, its logit L, an outside column with 100 or None)
    # labels (positions): 0, 1, 2, 199
    labels = torch.tensor([0, 1, 2, 199])
    plan = {
        0: (IMAGENET_A_INDICES[0], 10.0, None),  # right
        1: (IMAGENET_A_INDICES[2], 8.0, None),  # wrong (predicts position 2)
        2: (IMAGENET_A_INDICES[2], 6.0, 0),  # right once restricted; column 0 (not in the 200) is highest overall
        3: (IMAGENET_A_INDICES[199], 4.0, 999),  # right once restricted; column 999 is highest overall
    }
    calls = []

    def logits_fn(x):
        calls.append(x.shape[0])
        out = torch.zeros(x.shape[0], 1000)
        for r, i in enumerate(_ids(x)):
            col, L, outside = plan[i]
            out[r, col] = L
            if outside is not None:
                out[r, outside] = 100.0
        return out

    assert 0 not in IMAGENET_A_INDICES and 999 not in IMAGENET_A_INDICES
    res = evaluate_imagenet_a(logits_fn, _id_images(4), labels, batch_size=3)
    assert calls == [3, 1]
    assert res["n"] == 4
    assert res["accuracy"] == pytest.approx(3 / 4)
    # softmax over the 200 columns: one logit L, 199 zeros -> confidence e^L / (e^L + 199)
    conf = [math.exp(L) / (math.exp(L) + 199) for L in (10.0, 8.0, 6.0, 4.0)]
    # one bin (4 < 100): |mean confidence - 3/4|
    assert res["calibration_error"] == pytest.approx(abs(sum(conf) / 4 - 0.75), abs=1e-6)
    assert res["calibration_error_reference"] is None  # one bin (4 < 2 * 100): undefined
    # confidence order is the image order; correct 1, 0, 1, 1 -> (1 + 1/2 + 2/3 + 3/4) / 4 = 35/48
    assert res["aurra"] == pytest.approx(35 / 48)
    # unrestricted argmax would get images 2 and 3 wrong
    full = logits_fn(_id_images(4).float() / 255).argmax(1)
    assert full.tolist()[2:] == [0, 999]


def test_evaluate_imagenet_a_on_loaded_synthetic_folder(tmp_path):
    root = _make_subset_folder(tmp_path / "imagenet-a")
    images, labels, _ = load_imagenet_a(root, size=8, resize=10, allow_subset=True, indices=INDICES3)

    def always_position_5(x):  # predicts ImageNet-A position 5 for every image
        out = torch.zeros(x.shape[0], 1000)
        out[:, IMAGENET_A_INDICES[5]] = 3.0
        return out

    res = evaluate_imagenet_a(always_position_5, images, labels)
    assert res["accuracy"] == pytest.approx(1 / 4)  # only the image in the second folder
    assert res["n"] == 4


def test_evaluate_imagenet_a_matches_metrics_module():
    g = torch.Generator().manual_seed(0)
    n = 250
    images = _id_images(n)  # ids wrap at 256 -> fine for n = 250
    labels = torch.randint(0, 200, (n,), generator=g)
    table = torch.randn(n, 1000, generator=g) * 3

    def logits_fn(x):
        return table[_ids(x)]

    res = evaluate_imagenet_a(logits_fn, images, labels, batch_size=64)
    sub = table[:, list(IMAGENET_A_INDICES)]
    prob = sub.softmax(1)
    conf, pred = prob.max(1)
    correct = (pred == labels).numpy()
    assert res["accuracy"] == pytest.approx(float(correct.mean()))
    assert res["calibration_error"] == pytest.approx(metrics.calibration_error(conf.numpy(), correct, 100))
    assert res["calibration_error_reference"] == pytest.approx(metrics.calibration_error(conf.numpy(), correct, 100, skip_last_bin=True))
    assert res["aurra"] == pytest.approx(metrics.aurra(conf.numpy(), correct))
    assert res["calibration_error_reference"] > 0.0  # two bins: [0, 100), [100, 250); first one kept


def test_evaluate_imagenet_a_bad_input():
    images = _id_images(2)
    with pytest.raises(ValueError, match="at least 989"):
        evaluate_imagenet_a(lambda x: torch.zeros(x.shape[0], 10), images, [0, 1])
    with pytest.raises(ValueError, match="labels"):
        evaluate_imagenet_a(lambda x: torch.zeros(x.shape[0], 1000), images, [0, 200])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_imagenet_a(lambda x: torch.zeros(x.shape[0], 1000), images, [0])


# --- models trained on a subset of classes -----------------------------------------------------------

DATASET_WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005"]
MODEL_WNIDS = ["n00000004", "n09999999", "n00000001"]  # knows dataset classes 3 and 0; one class not in the dataset


def test_evaluate_subset_model_coverage_and_accuracy():
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    # covered: images 0, 1 (wnid n00000001 = model class 2) and 4, 5 (n00000004 = model class 0)
    predict = {0: 2, 1: 1, 4: 0, 5: 2}  # right, wrong, right, wrong
    margin = {0: 4.0, 1: 3.0, 4: 2.0, 5: 1.0}
    seen = []

    def logits_fn(x):
        ids = _ids(x)
        seen.extend(ids)
        out = torch.zeros(x.shape[0], 3)
        for r, i in enumerate(ids):
            out[r, predict[i]] = margin[i]
        return out

    res = evaluate_subset_model(logits_fn, _id_images(7), labels, MODEL_WNIDS, DATASET_WNIDS, batch_size=3)
    assert sorted(seen) == [0, 1, 4, 5]  # uncovered images are not run through the model
    assert res["classes_covered"] == 2 and res["classes_total"] == 5
    assert res["class_coverage"] == pytest.approx(2 / 5)
    assert res["images_covered"] == 4 and res["images_total"] == 7
    assert res["image_coverage"] == pytest.approx(4 / 7)
    assert res["covered_wnids"] == ["n00000001", "n00000004"]
    assert res["n"] == 4
    assert res["accuracy"] == pytest.approx(2 / 4)
    assert res["accuracy_all_images"] == pytest.approx(2 / 7)
    # confidence e^m / (e^m + 2), descending in image order; correct 1, 0, 1, 0 -> (1 + 1/2 + 2/3 + 2/4) / 4
    assert res["aurra"] == pytest.approx((1 + 0.5 + 2 / 3 + 0.5) / 4)
    conf = [math.exp(m) / (math.exp(m) + 2) for m in (4.0, 3.0, 2.0, 1.0)]
    assert res["calibration_error"] == pytest.approx(abs(sum(conf) / 4 - 0.5), abs=1e-6)
    assert res["calibration_error_reference"] is None  # one bin (4 < 2 * 100): undefined


def test_evaluate_subset_model_class_coverage_counts_classes_with_images():
    # dataset_wnids may list more classes than have images, and hold None for unknown wnids
    labels = torch.tensor([0, 3, 3])
    wnids = ["n00000001", None, "n00000003", "n00000004"]
    res = evaluate_subset_model(lambda x: torch.zeros(x.shape[0], 3), _id_images(3), labels, MODEL_WNIDS, wnids)
    assert res["classes_total"] == 2 and res["classes_covered"] == 2
    assert res["image_coverage"] == 1.0


def test_evaluate_subset_model_no_coverage():
    labels = torch.tensor([1, 2])

    def never_called(x):
        raise AssertionError("no image is covered")

    res = evaluate_subset_model(never_called, _id_images(2), labels, MODEL_WNIDS, DATASET_WNIDS)
    assert res["class_coverage"] == 0.0 and res["image_coverage"] == 0.0
    assert res["accuracy"] is None and res["aurra"] is None and res["n"] == 0
    assert res["accuracy_all_images"] == 0.0


def test_evaluate_subset_model_bad_input():
    labels = torch.tensor([0])
    with pytest.raises(ValueError, match="expected 3"):
        evaluate_subset_model(lambda x: torch.zeros(x.shape[0], 5), _id_images(1), labels, MODEL_WNIDS, DATASET_WNIDS)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_subset_model(lambda x: x, _id_images(1), labels, ["n00000001", "n00000001"], DATASET_WNIDS)


# --- ties, image order and undefined metrics -----------------------------------------------------------------


def test_evaluate_imagenet_a_does_not_depend_on_image_order():
    # saturated logits (one column at 100, like vote counts): most confidences are exactly 1.0 and tie
    g = torch.Generator().manual_seed(3)
    n = 250
    table = torch.zeros(n, 1000)
    top = torch.tensor(IMAGENET_A_INDICES)[torch.randint(0, 3, (n,), generator=g)]
    table[torch.arange(n), top] = torch.where(torch.rand(n, generator=g) < 0.8, 100.0, 1.0)
    labels = torch.randint(0, 3, (n,), generator=g)

    def logits_fn(x):
        return table[_ids(x)]

    res = evaluate_imagenet_a(logits_fn, _id_images(n), labels)
    perm = torch.randperm(n, generator=g)
    res_perm = evaluate_imagenet_a(logits_fn, _id_images(n)[perm], labels[perm])
    assert res == res_perm  # exact, every metric
    conf = table[:, list(IMAGENET_A_INDICES)].softmax(1).max(1).values
    assert int((conf == 1.0).sum()) > n // 2
    assert res["calibration_error_reference"] is not None  # 250 >= 2 * 100: two bins


def _wnid_checkpoint(path, classes):
    import bagcert

    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
    bagcert.save_checkpoint(path, model, input_size=32, classes=list(classes))
    return path


def _wnid_folder(root, wnids, per_class):
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for k in range(per_class):
            _save(root / w / f"{k}.png", rng.integers(0, 256, (12, 10, 3)), "PNG")
    return root


def _table_rows(summary: str) -> dict:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_cli_report_says_na_and_json_null_for_the_undefined_reference_error(tmp_path, capsys):
    import json

    from bagcert.cli import imagenet_a as cli_ina

    wnids = ["n01440764", "n02102040"]
    ckpt = _wnid_checkpoint(tmp_path / "m.pt", wnids)
    root = _wnid_folder(tmp_path / "data", wnids, 3)  # 6 images < 2 * 100: a single bin
    out = tmp_path / "out"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--output", str(out), "--quiet", "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 6 and res["calibration_error_reference"] is None
    assert '"calibration_error_reference": null' in (out / "results.json").read_text()
    assert isinstance(res["calibration_error"], float) and isinstance(res["aurra"], float)
    rows = _table_rows((out / "summary.md").read_text())
    assert rows["RMS calibration error (reference: last bin dropped)"] == "n/a"
    assert rows["RMS calibration error (adaptive bins, all)"].endswith(" %")
    assert rows["AURRA"].endswith(" %")
    assert "needs at least 2 bins" in (out / "summary.md").read_text()
    # with bins of 3 images there are two bins and the value is defined
    out3 = tmp_path / "out3"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--bin-size", "3", "--output", str(out3), "--quiet", "--threads", "1"]) == 0
    assert isinstance(json.loads((out3 / "results.json").read_text())["calibration_error_reference"], float)
    assert _table_rows((out3 / "summary.md").read_text())["RMS calibration error (reference: last bin dropped)"].endswith(" %")


def test_cli_report_with_no_covered_image_says_na_everywhere(tmp_path, capsys):
    import json

    from bagcert.cli import imagenet_a as cli_ina

    ckpt = _wnid_checkpoint(tmp_path / "m.pt", ["n01440764", "n02102040"])
    root = _wnid_folder(tmp_path / "data", ["n05555555"], 2)  # no class the model knows
    out = tmp_path / "out"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--output", str(out), "--quiet", "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "calibration_error", "calibration_error_reference", "aurra"):
        assert res[key] is None
    assert line["accuracy"] is None and line["aurra"] is None and line["n"] == 0
    rows = _table_rows((out / "summary.md").read_text())
    for name in ("top-1 accuracy", "RMS calibration error (adaptive bins, all)",
                 "RMS calibration error (reference: last bin dropped)", "AURRA"):
        assert rows[name] == "n/a"
    assert "n/a: no image was evaluated" in (out / "summary.md").read_text()
    assert not (out / "response_rate.png").exists()
