"""certify.py and train.py run end to end in-process; reports match their schema."""

import json
import re

import pytest
import torch

import bagcert
from bagcert.cli import certify
import train
from conftest import ROOT


def _last_json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_certify_synthetic_report(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    rc = certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:40", "--patch-sizes", "1,5,3x7", "--output", str(out), "--no-progress"])
    assert rc == 0
    line = _last_json_line(capsys.readouterr().out)
    assert set(line["certified_accuracy"]) == {"1", "5", "3x7"} and line["num_images"] == 40
    res = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "bagcert_version", "torch_version", "git_sha", "device", "hardware", "config", "dataset",
                "clean_accuracy", "certified_accuracy", "certified_count", "images_per_s", "certify_forward_ratio", "timing"):
        assert key in res
    assert res["dataset"]["name"] == "synthetic" and res["num_images"] == 40
    assert res["certified_accuracy"]["1"] >= res["certified_accuracy"]["5"]
    rows = (out / "per_sample.csv").read_text().strip().splitlines()
    assert len(rows) == 41 and rows[0].startswith("index,dataset_index,source,label,prediction,correct,certified_1,margin_1")
    assert (out / "summary.md").read_text().startswith("# Certification report")
    # the report's numbers are the library's numbers
    model, _ = bagcert.load_checkpoint(tiny_checkpoint)
    data = bagcert.data.load_dataset("synthetic:40", "test")
    direct = bagcert.certify(model, data.float_images(), data.labels, patch_size=(3, 7))
    assert res["certified_count"]["3x7"] == int(direct.certified_correct.sum())
    assert [int(r.split(",")[-4]) for r in rows[1:]] == direct.certified.int().tolist()
    assert [r.split(",")[1] for r in rows[1:]] == [str(i) for i in range(40)]  # dataset_index: the synthetic set's own order


def test_certify_default_runs_on_bundled_samples(tmp_path, capsys):
    if not certify.DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no shipped checkpoint yet")
    rc = certify.main(["--output", str(tmp_path / "r"), "--no-progress", "--patch-sizes", "2,5"])
    assert rc == 0
    line = _last_json_line(capsys.readouterr().out)
    assert line["num_images"] == 200 and 0 <= line["certified_accuracy"]["5"] <= line["clean_accuracy"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--patch-sizes", "0"], "positive"),
        (["--patch-sizes", "a,b"], "not understood"),
        (["--patch-sizes", "40"], "larger than"),
        (["--dataset", "/nonexistent/folder"], "not found"),
    ],
)
def test_certify_bad_arguments(tiny_checkpoint, tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--output", str(tmp_path / "o"), "--no-progress"] + argv)


def test_certify_foreign_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(SystemExit, match="not a torch checkpoint|truncated"):
        certify.main(["--checkpoint", str(bad), "--dataset", "synthetic:8", "--output", str(tmp_path / "o")])


def test_train_cli_smoke_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(["--dataset", "synthetic:96", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--epochs", "2",
                     "--batch-size", "32", "--eval-images", "32", "--output", str(out), "--no-progress", "--no-tensorboard"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "cifar_bagnet5_s2" and cfg["epochs"] == 2
    model, meta = bagcert.load_checkpoint(out / "model.pt")
    assert meta["trained_steps"] == 6 and meta["input_size"] == 32
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in log) and log[-1]["done"]
    # replay from the saved config file
    rc = train.main(["--config", str(out / "config.json"), "--output", str(tmp_path / "replay"), "--no-progress", "--no-tensorboard"])
    replay, _ = bagcert.load_checkpoint(tmp_path / "replay" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replay.state_dict().values()))


def _wnid_folder(root, n_per_class=6):
    from PIL import Image

    wnids = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
             "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
    g = torch.Generator().manual_seed(0)
    for c, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for k in range(n_per_class):
            base = torch.tensor([c * 25, 255 - c * 20, (c * 70) % 256], dtype=torch.float32).view(1, 1, 3)
            img = (base + 30 * torch.rand(44, 52, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(img).save(root / wnid / f"{k}.png")
    return wnids


def test_imagenet_style_training_records_split_and_certify_reuses_it(tmp_path, capsys):
    """train.py on a wnid folder without splits: random crops, seeded split and ImageNet indices in the metadata;
    certify.py then certifies exactly the test part, with patch sizes given as a share of the image area."""
    data = tmp_path / "inet"
    wnids = _wnid_folder(data)
    out = tmp_path / "run"
    rc = train.main(["--dataset", str(data), "--image-size", "32", "--resize", "40", "--random-crop", "--pad", "0",
                     "--model", "image_bagnet17_s8", "--model-kwargs", '{"width": 16}', "--patch-sizes", "4",
                     "--epochs", "1", "--batch-size", "16", "--split-seed", "3", "--test-fraction", "0.25",
                     "--output", str(out), "--no-progress", "--no-tensorboard"])
    assert rc == 0
    _, meta = bagcert.load_checkpoint(out / "model.pt")
    assert meta["classes"] == wnids and meta["imagenet_indices"][:3] == [0, 217, 482]
    assert meta["split"]["seed"] == 3 and meta["split"]["num_test"] == 15 and meta["split"]["num_images"] == 60
    assert meta["input_size"] == 32 and meta["resize"] == 40
    capsys.readouterr()
    rc = certify.main(["--checkpoint", str(out / "model.pt"), "--dataset", str(data), "--patch-sizes", "1%,4,3%",
                       "--output", str(tmp_path / "rep"), "--no-progress", "--quiet"])
    assert rc == 0
    line = _last_json_line(capsys.readouterr().out)
    assert line["num_images"] == 15 and set(line["certified_accuracy"]) == {"3", "4", "6"}  # 1 % of 32x32 -> 3, 3 % -> 6
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["dataset"]["seeded_split"] == {"seed": 3, "test_fraction": 0.25, "num_images": 60}
    assert res["config"]["patch_area_sizes"] == {"1%": "3x3", "3%": "6x6"}
    rc = certify.main(["--checkpoint", str(out / "model.pt"), "--dataset", str(data), "--split", "all", "--patch-sizes", "4",
                       "--output", str(tmp_path / "rep_all"), "--no-progress", "--quiet"])
    assert _last_json_line(capsys.readouterr().out)["num_images"] == 60
    with pytest.raises(SystemExit, match="percentage"):
        certify.main(["--checkpoint", str(out / "model.pt"), "--dataset", str(data), "--patch-sizes", "x%", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--random-crop needs --resize"):
        train.main(["--dataset", str(data), "--image-size", "32", "--random-crop", "--output", str(tmp_path / "bad")])


def test_patch_side_for_area():
    from bagcert.geometry import patch_side_for_area

    assert [patch_side_for_area(p, 224) for p in (1, 2, 3)] == [22, 32, 39]
    assert [patch_side_for_area(p, 128) for p in (1, 2, 3)] == [13, 18, 22]
    assert patch_side_for_area(2, (32, 32)) == 5  # CIFAR-10's 5x5 patch is 2.4 %
    with pytest.raises(ValueError, match="percentage"):
        patch_side_for_area(0, 32)


def test_certify_report_names_the_method_and_its_forward_passes(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m"
    rc = certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:6", "--patch-sizes", "2", "--aggregation", "clipped",
                       "--output", str(out), "--no-progress", "--quiet"])
    assert rc == 0
    line = _last_json_line(capsys.readouterr().out)
    assert line["method"] == "bagcert" and line["forward_passes_per_image"] == 1
    res = json.loads((out / "results.json").read_text())
    assert (res["method"], res["forward_passes_per_image"], res["peer"], res["aggregation"]) == ("bagcert", 1, None, "clipped")
    assert "- method: bagcert (1 network evaluation per image)" in (out / "summary.md").read_text()


def test_train_without_a_test_split_says_it_holds_out_a_seeded_split(tmp_path, capsys):
    """A CIFAR-style folder with train/ but no test/: train.py evaluates on a seeded split of the training images
    and says so on stderr (it used to swallow every loading error, so a broken test split went unnoticed)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(16):
            img = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(img).save(tmp_path / "data" / "train" / c / f"{i}.png")
    out = tmp_path / "run"
    rc = train.main(["--dataset", str(tmp_path / "data"), "--num-classes", "2", "--model", "cifar_bagnet5_s2",
                     "--model-kwargs", '{"width": 8}', "--max-steps", "1", "--batch-size", "8", "--test-fraction", "0.25",
                     "--output", str(out), "--no-progress", "--no-tensorboard"])
    assert rc == 0
    assert "no test split" in capsys.readouterr().err
    _, meta = bagcert.load_checkpoint(out / "model.pt")
    assert meta["split"]["num_test"] == 8 and meta["split"]["num_images"] == 32


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_thread_counts_are_validated(value, tmp_path, capsys):
    from bagcert.cli import defensive_patch, imagenet_a, roi
    from bagcert.training import TrainConfig
    from bagcert.training import train as train_fn

    for parser in (certify.build_parser(), defensive_patch.build_parser(), imagenet_a.build_parser(), roi.build_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", value])
        assert "--threads" in capsys.readouterr().err
    if value.lstrip("-").isdigit():  # train.py reads an int (also from a config file); train() refuses it
        cfg = TrainConfig(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, threads=int(value),
                          output=str(tmp_path / "t"), tensorboard=False, progress=False)
        with pytest.raises(ValueError, match="threads must be a positive int"):
            train_fn(cfg, bagcert.data.synthetic_dataset(16))


@pytest.mark.parametrize("module, flag, bad, good", [
    ("roi", "--num-figures", "-1", "0"),  # was clipped to 0 without a word
    ("roi", "--batch-size", "0", "1"),
    ("roi", "--num-images", "0", "1"),
    ("roi", "--occlusion-stride", "0", "1"),
    ("roi", "--steps", "-3", "0"),
    ("defensive_patch", "--stage1-epochs", "-1", "0"),  # was range(-1): a skipped stage without a word
    ("defensive_patch", "--stage2-epochs", "-1", "0"),
    ("defensive_patch", "--batch-size", "0", "1"),
    ("defensive_patch", "--eval-batch-size", "0", "1"),
    ("defensive_patch", "--attack-restarts", "0", "1"),
    ("defensive_patch", "--max-shift", "-2", "0"),
    ("defensive_patch", "--attack-patch-size", "-5", "0"),  # 0 skips the patch attack
    ("imagenet_a", "--batch-size", "0", "1"),
    ("imagenet_a", "--bin-size", "0", "1"),
    ("imagenet_a", "--size", "-32", "32"),
])
def test_analysis_cli_counts_are_validated(module, flag, bad, good, capsys):
    import importlib

    parser = importlib.import_module(f"bagcert.cli.{module}").build_parser()
    required = ["--checkpoint", "c.pt", "--dataset", "d"]
    with pytest.raises(SystemExit):
        parser.parse_args([*required, flag, bad])
    err = capsys.readouterr().err
    assert flag in err and bad in err
    assert getattr(parser.parse_args([*required, flag, good]), flag.lstrip("-").replace("-", "_")) == int(good)


@pytest.mark.parametrize("text, match", [
    ("{bad json", r"--model-kwargs: not valid JSON \(Expecting property name .* at character 1\); expected an object"),
    ("[1, 2]", r"--model-kwargs: expected a JSON object such as '\{\"width\": 128\}', got '\[1, 2\]'"),
])
def test_model_kwargs_that_are_not_a_json_object_are_one_clear_line(text, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic:16", "--model-kwargs", text, "--output", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


def test_model_kwargs_with_a_wrong_type_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic:16", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": true}',
                    "--output", str(tmp_path / "run")])
    message = str(exc.value.code)
    assert "\n" not in message and message.endswith("width must be a positive int, got True"), message
    assert not (tmp_path / "run").exists()
