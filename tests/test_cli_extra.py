"""python -m bagcert.cli.{imagenet_a, defensive_patch, roi}: in-process smoke runs on tiny synthetic data.

The real ImageNet-A images are not available here: the ImageNet-A runs use synthetic folders of the
same ``<wnid>/<image>`` layout.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bagcert
from bagcert.analysis import evaluate_neutralization
from bagcert.cli import defensive_patch as cli_defpatch
from bagcert.cli import imagenet_a as cli_ina
from bagcert.cli import roi as cli_roi
from bagcert.defense import DefensivePatch
from bagcert.imagenet_a import evaluate_imagenet_a, evaluate_subset_model, load_imagenet_a

ENV_KEYS = ("schema_version", "tool", "bagcert_version", "torch_version", "git_sha", "created", "device", "hardware", "config")


def _last_json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _checkpoint(path, classes, seed=0):
    torch.manual_seed(seed)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
    bagcert.save_checkpoint(path, model, input_size=32, classes=list(classes))
    return path


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _image_folder(root, wnids, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / w / f"{k}.png")
    return root


# --- ImageNet-A -------------------------------------------------------------------------------------
def test_imagenet_a_cli_200_class_protocol(tmp_path, capsys):
    ckpt = tmp_path / "in1k.pt"
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=1000, width=8).eval()
    bagcert.save_checkpoint(ckpt, model, input_size=32)
    root = _image_folder(tmp_path / "imagenet-a", [f"n{10000000 + j:08d}" for j in range(200)], 1)
    (root / "README.txt").write_text("ignored")
    out = tmp_path / "ina"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--resize", "32", "--output", str(out), "--quiet"]) == 0
    line = _last_json_line(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    for key in ENV_KEYS + ("accuracy", "calibration_error", "calibration_error_reference", "aurra", "n", "dataset", "checkpoint"):
        assert key in res
    assert res["tool"] == "bagcert.cli.imagenet_a" and res["mode"] == "imagenet-a" and res["n"] == 200
    data = load_imagenet_a(root, size=32, resize=32)
    direct = evaluate_imagenet_a(model.mean_logits, data.images, data.labels)
    for key in ("accuracy", "calibration_error", "aurra"):
        assert res[key] == pytest.approx(direct[key]) and line[key] == pytest.approx(direct[key])
    assert (out / "summary.md").read_text().startswith("# ImageNet-A style evaluation")
    assert (out / "response_rate.png").is_file() == _has_matplotlib()


def test_imagenet_a_cli_subset_model_reports_coverage(tmp_path, capsys):
    model_wnids = ["n01440764", "n02102040", "n03000684", "n09999999"]
    ckpt = _checkpoint(tmp_path / "sub.pt", model_wnids)
    root = _image_folder(tmp_path / "folder", ["n01440764", "n02102040", "n05555555"], 2)  # 2 of 3 classes known
    out = tmp_path / "sub"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--output", str(out), "--quiet"]) == 0
    line = _last_json_line(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "subset"
    assert (res["classes_covered"], res["classes_total"], res["images_covered"], res["images_total"]) == (2, 3, 4, 6)
    assert line["image_coverage"] == pytest.approx(4 / 6) and line["class_coverage"] == pytest.approx(2 / 3)
    model, _ = bagcert.load_checkpoint(ckpt)
    data = bagcert.data.load_image_folder(root, size=32, resize=37)
    direct = evaluate_subset_model(model.mean_logits, data.images, data.labels, model_wnids, data.classes)
    assert res["accuracy"] == pytest.approx(direct["accuracy"]) and res["aurra"] == pytest.approx(direct["aurra"])
    assert res["covered_wnids"] == ["n01440764", "n02102040"]


def test_imagenet_a_cli_refuses_a_non_imagenet_model(tmp_path):
    ckpt = _checkpoint(tmp_path / "c.pt", ["cat", "dog"])
    root = _image_folder(tmp_path / "folder", ["n01440764"], 1)
    with pytest.raises(SystemExit, match="1000-class"):
        cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--mode", "imagenet-a", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="wnids"):
        cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--output", str(tmp_path / "o")])


# --- defensive patches --------------------------------------------------------------------------------
def test_defensive_patch_cli_makes_saves_and_evaluates(tmp_path, capsys):
    classes = [f"class{i}" for i in range(4)]
    src, other = _checkpoint(tmp_path / "m.pt", classes, 0), _checkpoint(tmp_path / "m2.pt", classes, 1)
    out = tmp_path / "dp"
    common = ["--checkpoint", str(src), "--dataset", "synthetic:16", "--num-eval", "8", "--severities", "1,5",
              "--pgd-steps", "1", "--attack-steps", "1", "--quiet"]
    argv = common + ["--transfer-checkpoint", str(other), "--num-train", "16", "--stage1-epochs", "1",
                     "--stage2-epochs", "2", "--milestones", "1", "--batch-size", "8", "--corruptions", "gaussian_noise,jpeg",
                     "--output", str(out)]
    assert cli_defpatch.main(argv) == 0
    line = _last_json_line(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    for key in ENV_KEYS + ("checkpoint", "dataset", "patch", "evaluations"):
        assert key in res
    assert res["patch"]["pixels_per_channel"] == 224 and res["patch"]["fraction_of_image"] == pytest.approx(224 / 1024)
    assert [h["lr_scale"] for h in res["patch"]["history"]["global_correlation"]] == pytest.approx([1.0, 1 / 3])
    assert set(res["evaluations"]) == {"source", str(other)}
    src_eval = res["evaluations"]["source"]
    assert src_eval["n"] == 8 and set(src_eval["corruptions"]) == {"gaussian_noise", "jpeg"}
    assert len(src_eval["corruptions"]["jpeg"]["with"]) == 2
    assert line["clean"] == src_eval["clean"] and line["num_images"] == 8
    patch = DefensivePatch.load(out / "defensive_patch.pt")
    assert patch.num_classes == 4 and patch.num_pixels == 224
    # the report's numbers are the library's numbers
    model, _ = bagcert.load_checkpoint(src)
    test = bagcert.data.load_dataset("synthetic:16", "test", size=32, num_classes=4)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:8].sort().values
    x, y = test.float_images(perm), test.labels[perm]
    with torch.no_grad():
        assert src_eval["clean"]["with"] == pytest.approx(float((model(patch.apply(x, y)).argmax(1) == y).float().mean()))
    md = (out / "summary.md").read_text()
    assert md.startswith("# Defensive patch evaluation") and "transfer (held out): " in md
    if _has_matplotlib():
        assert (out / "patches.png").is_file() and (out / "corruptions.png").is_file()
    # evaluating the saved patch again gives the same numbers
    out2 = tmp_path / "dp2"
    assert cli_defpatch.main(common + ["--patch", str(out / "defensive_patch.pt"), "--corruptions", "gaussian_noise",
                                       "--output", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())["evaluations"]["source"]
    assert res2["clean"] == src_eval["clean"] and res2["pgd"] == src_eval["pgd"]
    assert res2["corruptions"]["gaussian_noise"] == src_eval["corruptions"]["gaussian_noise"]


def test_defensive_patch_cli_ensemble_stage2(tmp_path, capsys):
    """--ensemble-checkpoint: stage 2 keeps one copy per model (one cross-entropy per model and epoch in the
    history); the patches are evaluated on the ensemble model and on the held-out transfer model."""
    classes = [f"class{i}" for i in range(3)]
    a, b, c = (_checkpoint(tmp_path / f"{k}.pt", classes, k) for k in range(3))
    out = tmp_path / "ens"
    argv = ["--checkpoint", str(a), "--ensemble-checkpoint", str(b), "--transfer-checkpoint", str(c), "--dataset", "synthetic:12",
            "--num-eval", "6", "--num-train", "12", "--stage1-epochs", "1", "--stage2-epochs", "2", "--batch-size", "6",
            "--corruptions", "none", "--pgd-eps", "0", "--attack-patch-size", "0", "--output", str(out), "--quiet"]
    assert cli_defpatch.main(argv) == 0
    line = _last_json_line(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    assert res["ensemble_checkpoints"] == [str(b)] and res["transfer_checkpoints"] == [str(c)]
    assert all(len(h["ce"]) == 2 for h in res["patch"]["history"]["global_correlation"])
    assert set(res["evaluations"]) == {"source", str(b), str(c)} and set(line["ensemble"]) == {str(b)}
    md = (out / "summary.md").read_text()
    assert f"ensemble: {b}" in md and f"transfer (held out): {c}" in md
    with pytest.raises(SystemExit, match="held out"):
        cli_defpatch.main(argv[:-3] + ["--transfer-checkpoint", str(b), "--output", str(tmp_path / "x")])


def test_defensive_patch_cli_bad_arguments(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    base = ["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="severities"):
        cli_defpatch.main(base + ["--severities", "1,7"])
    with pytest.raises(SystemExit, match="unknown"):
        cli_defpatch.main(base + ["--corruptions", "fog"])


# --- RoI / RoA -----------------------------------------------------------------------------------------
def test_roi_cli_report(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt", [f"class{i}" for i in range(4)])
    out = tmp_path / "roi"
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic:16", "--num-images", "6", "--steps", "2",
            "--qs", "5,20", "--num-figures", "2", "--output", str(out), "--quiet"]
    assert cli_roi.main(argv) == 0
    line = _last_json_line(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    for key in ENV_KEYS + ("clean_accuracy", "adversarial_accuracy", "neutralized_accuracy_oracle",
                           "neutralized_accuracy_gradient", "neutralized_clean_accuracy", "iou_oracle", "iou_gradient"):
        assert key in res
    assert res["roi_method"] == "local" and res["n"] == 6 and set(res["iou_oracle"]) == {"5.0", "20.0"}
    assert "examples" not in res
    model, _ = bagcert.load_checkpoint(ckpt)
    data = bagcert.data.load_dataset("synthetic:16", "test", size=32, num_classes=4)
    idx = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:6].sort().values
    direct = evaluate_neutralization(model, data.images[idx], data.labels[idx], steps=2, qs=(5, 20), seed=0)
    for key in ("clean_accuracy", "adversarial_accuracy", "neutralized_accuracy_oracle"):
        assert res[key] == pytest.approx(direct[key]) and line[key] == pytest.approx(direct[key])
    assert res["iou_oracle"] == pytest.approx(direct["iou_oracle"])
    assert (out / "summary.md").read_text().startswith("# Region of Importance")
    if _has_matplotlib():
        assert (out / "heatmaps.png").is_file() and (out / "iou.png").is_file()
    with pytest.raises(SystemExit, match="odd"):
        cli_roi.main(argv[:-3] + ["--roa-box", "2", "--output", str(tmp_path / "bad")])


def test_imagenet_a_cli_subset_mode_never_evaluates_the_training_images(tmp_path, capsys):
    """On the checkpoint's own training folder (no split folders) --split auto takes the seeded test part."""
    wnids = ["n01440764", "n02102040"]
    root = _image_folder(tmp_path / "folder", wnids, 5)
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=2, width=8).eval()
    ckpt = tmp_path / "s.pt"
    bagcert.save_checkpoint(ckpt, model, input_size=32, classes=wnids, split={"seed": 1, "test_fraction": 0.4, "num_images": 10})
    out = tmp_path / "o"
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--resize", "32", "--output", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 4 and res["dataset"]["split"] == "test" and res["dataset"]["seeded_split"]["seed"] == 1
    data = bagcert.data.load_image_folder(root, size=32, resize=32)
    _, te = bagcert.data.seeded_split(10, 0.4, 1)
    direct = evaluate_subset_model(model.mean_logits, data.images[te], data.labels[te], wnids, data.classes)
    assert res["accuracy"] == pytest.approx(direct["accuracy"]) and res["aurra"] == pytest.approx(direct["aurra"])
    assert "split test of the checkpoint's seeded split" in (out / "summary.md").read_text()
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(root), "--resize", "32", "--split", "all",
                         "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["n"] == 10
    # another folder (e.g. ImageNet-A itself): auto takes every image, an explicit test part does not exist
    other = _image_folder(tmp_path / "other", wnids, 3)
    assert cli_ina.main(["--checkpoint", str(ckpt), "--data", str(other), "--resize", "32", "--output", str(out), "--overwrite",
                         "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["dataset"]["split"] == "all"
    with pytest.raises(SystemExit, match="6 images but the checkpoint's seeded split was made over 10"):
        cli_ina.main(["--checkpoint", str(ckpt), "--data", str(other), "--split", "test", "--output", str(tmp_path / "o2"), "--quiet"])


def test_analysis_clis_load_the_checkpoint_split_part(tmp_path):
    """roi / defensive_patch load data through load_model_and_data: train and test parts are disjoint."""
    from bagcert.cli._common import load_model_and_data

    wnids = ["n01440764", "n02102040"]
    root = _image_folder(tmp_path / "folder", wnids, 5)
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=2, width=8).eval()
    ckpt = tmp_path / "s.pt"
    bagcert.save_checkpoint(ckpt, model, input_size=32, resize=32, classes=wnids,
                            split={"seed": 2, "test_fraction": 0.3, "num_images": 10})
    _, _, test = load_model_and_data(str(ckpt), str(root), "test", 0, None)
    _, _, train = load_model_and_data(str(ckpt), str(root), "train", 0, None)
    whole = bagcert.data.load_image_folder(root, size=32, resize=32)
    tr, te = bagcert.data.seeded_split(10, 0.3, 2)
    assert torch.equal(test.images, whole.images[te]) and torch.equal(train.images, whole.images[tr])


# ------------------------------------------------------------------------------------------------ certify: data paths
from bagcert.cli import certify as cli_certify  # noqa: E402

FAST = ["--threads", "1", "--no-progress", "--quiet"]


def _png_folder(root, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"img{k}.png")
    return root


def _split_checkpoint(tmp_path, classes, n):
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
    return bagcert.save_checkpoint(tmp_path / "m.pt", model, input_size=32, resize=32, classes=classes,
                                   split={"seed": 1, "test_fraction": 0.5, "num_images": n})


_NUMBERS = ("num_images", "correct_count", "clean_accuracy", "certified_accuracy", "certified_count", "dataset", "method",
            "forward_passes_per_image", "aggregation", "certified_broken")


@pytest.mark.parametrize("extra", [["--split", "all"], ["--num-images", "5", "--batch-size", "2"]])
def test_stream_and_memory_paths_give_the_same_report(extra, tmp_path, capsys):
    """The same folder of PNGs certified in memory and streamed: the same results.json numbers and the same
    per_sample.csv, whose dataset_index / source are the whole folder's index and file on both paths."""
    classes = ["ant", "bee", "cat"]
    root = _png_folder(tmp_path / "folder", classes, 6)
    ckpt = _split_checkpoint(tmp_path, classes, 18)
    docs, csvs = {}, {}
    for path in ("memory", "stream"):
        out = tmp_path / path
        assert cli_certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--patch-sizes", "3,5", "--data-path", path,
                                 "--output", str(out), *extra, *FAST]) == 0
        assert f"data path: {path}: forced" in capsys.readouterr().err
        docs[path] = json.loads((out / "results.json").read_text())
        csvs[path] = (out / "per_sample.csv").read_text()
        assert docs[path]["config"]["data_path"] == path and docs[path]["config"]["data_path_reason"].startswith(f"{path}: forced")
    assert {k: docs["memory"][k] for k in _NUMBERS} == {k: docs["stream"][k] for k in _NUMBERS}
    assert csvs["memory"] == csvs["stream"]
    rows = csvs["stream"].splitlines()[1:]
    whole = bagcert.data.load_image_folder(root, size=32, resize=32)
    for row in rows:
        i, src = int(row.split(",")[1]), row.split(",")[2]
        assert whole.sources[i] == src  # the whole folder's index and file
    if "--num-images" in extra:
        _, test_part = bagcert.data.seeded_split(18, 0.5, 1)
        assert len(rows) == 5 and {int(r.split(",")[1]) for r in rows} <= set(test_part.tolist())
    else:
        assert len(rows) == 18


def test_auto_data_path_is_recorded_and_attacks_stay_in_memory(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "auto"
    assert cli_certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:6", "--patch-sizes", "2",
                             "--output", str(out), *FAST]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["data_path_requested"] == "auto" and doc["config"]["data_path"] == "memory"  # 18 KB fits
    assert "fits the budget" in doc["config"]["data_path_reason"]
    with pytest.raises(SystemExit, match="--attacks need the images in memory"):
        cli_certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:6", "--data-path", "stream",
                          "--attacks", "pgd", "--output", str(tmp_path / "x"), *FAST])


def test_streamed_certification_holds_no_images(tiny_checkpoint, tmp_path):
    """The stream source handed to the batch loop has no pixels (a shape on the meta device); its batches are
    decoded by the loader one at a time and the results equal the in-memory ones."""
    from bagcert.evaluation import StreamSource, certify_dataset
    from bagcert.streaming import TensorStream

    data = bagcert.data.synthetic_dataset(7, 10, 32, seed=3)
    model, _ = bagcert.load_checkpoint(tiny_checkpoint)
    source = StreamSource(TensorStream(data))
    assert source.images.device.type == "meta" and source.images.shape == data.images.shape
    streamed, timing = certify_dataset(model, source, [2, (3, 5)], batch_size=3)
    held, _ = certify_dataset(model, data, [2, (3, 5)], batch_size=3)
    assert timing["images"] == 7
    for k in held:
        for f in ("prediction", "label", "correct", "certified", "margin", "worst_position"):
            assert torch.equal(getattr(streamed[k], f), getattr(held[k], f)), (k, f)
        assert streamed[k].position_margins is None  # only the per-sample rows are kept


def test_run_certification_is_the_cli_without_argv(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:9", "--patch-sizes", "2,3x5",
                             "--output", str(out), *FAST]) == 0
    cli = json.loads((out / "results.json").read_text())
    summary = cli_certify.run_certification(tiny_checkpoint, "synthetic:9", [2, (3, 5)], threads=1)
    assert {k: summary[k] for k in _NUMBERS} == {k: cli[k] for k in _NUMBERS}
    assert capsys.readouterr().out.count("\n") == 1  # the CLI's JSON line only; the library prints nothing to stdout
    kept = cli_certify.run_certification(tiny_checkpoint, "synthetic:9", "2", output=tmp_path / "lib", data_path="stream")
    assert (tmp_path / "lib" / "per_sample.csv").is_file() and kept["config"]["data_path"] == "stream"
    with pytest.raises(ValueError, match="unknown option"):
        cli_certify.run_certification(tiny_checkpoint, "synthetic:9", [2], batchsize=3)
    with pytest.raises(ValueError, match="already holds a report"):
        cli_certify.run_certification(tiny_checkpoint, "synthetic:9", [2], output=tmp_path / "lib")


# ------------------------------------------------------------------------------------------------ default report folders
def test_default_report_folder_is_replaced_and_an_explicit_one_is_refused(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:4", "--patch-sizes", "2", "--threads", "1", "--no-progress"]
    assert cli_certify.main(argv) == 0
    first = json.loads((tmp_path / "outputs" / "certify" / "results.json").read_text())["run_id"]
    assert "replacing" not in capsys.readouterr().err
    assert cli_certify.main(argv) == 0  # the README's plain rerun
    captured = capsys.readouterr()
    assert ("replacing the previous report in outputs/certify (default folder; pass --output to keep reports)"
            in captured.err)
    assert "report written to outputs/certify/ (certified_accuracy.png, per_sample.csv, results.json, summary.md)" in captured.out
    assert json.loads((tmp_path / "outputs" / "certify" / "results.json").read_text())["run_id"] != first
    with pytest.raises(SystemExit, match="already holds a report"):  # named by the user: kept unless --overwrite
        cli_certify.main(argv + ["--output", "outputs/certify"])
    assert cli_certify.main(argv + ["--output", "outputs/certify", "--overwrite"]) == 0


def test_default_folder_of_the_analysis_tools_is_replaced(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:4", "--steps", "0", "--num-figures", "0",
            "--threads", "1", "--quiet"]
    assert cli_roi.main(argv) == 0
    assert cli_roi.main(argv) == 0
    assert "replacing the previous report in outputs/roi (default folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="already holds a report"):
        cli_roi.main(argv + ["--output", "outputs/roi"])


def test_distributed_streamed_certification_matches_one_process(tmp_path):
    """torchrun, 2 processes (gloo), --data-path stream: disjoint shards, and the merged report equals a
    one-process run on the same folder."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    classes = ["ant", "bee", "cat"]
    root = _png_folder(tmp_path / "folder", classes, 5)
    ckpt = _split_checkpoint(tmp_path, classes, 15)
    args = [str(ROOT / "certify.py"), "--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all", "--patch-sizes", "3,5",
            "--data-path", "stream", "--batch-size", "4", *FAST]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(port)] + args + ["--output", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert cli_certify.main(args[1:] + ["--output", str(tmp_path / "one")]) == 0
    r2 = json.loads((tmp_path / "ddp" / "results.json").read_text())
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    assert r2["config"]["world_size"] == 2 and r2["config"]["data_path"] == "stream"
    assert {k: r2[k] for k in _NUMBERS} == {k: r1[k] for k in _NUMBERS}
    assert (tmp_path / "ddp" / "per_sample.csv").read_text() == (tmp_path / "one" / "per_sample.csv").read_text()


@pytest.mark.parametrize("tool", ["certify", "roi"])
def test_no_cache_flag_neither_reads_nor_writes_the_decode_cache(tool, tmp_path, monkeypatch, capsys):
    """--no-cache decodes afresh: no entry appears in $BAGCERT_CACHE; without it the folder is cached there."""
    classes = ["ant", "bee", "cat"]
    root = _png_folder(tmp_path / "folder", classes, 4)
    ckpt = _split_checkpoint(tmp_path, classes, 12)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BAGCERT_CACHE", str(cache))
    monkeypatch.delenv("BAGCERT_NO_CACHE", raising=False)
    if tool == "certify":
        run = lambda out, *flags: cli_certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--patch-sizes", "3",
                                                    "--data-path", "memory", "--output", str(out), *flags, *FAST])
    else:
        run = lambda out, *flags: cli_roi.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all",
                                                "--num-images", "2", "--attack-patch-size", "3", "--steps", "1", "--num-figures", "0",
                                                "--output", str(out), "--threads", "1", "--quiet", *flags])
    assert run(tmp_path / "a", "--no-cache") == 0
    assert not cache.exists() or not any(cache.rglob("*.pt"))
    assert run(tmp_path / "b") == 0
    assert any(cache.rglob("*.pt"))
