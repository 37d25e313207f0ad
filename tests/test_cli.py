"""certify.py and train.py run end to end in-process; reports match their schema."""

import json

import pytest
import torch

import bagcert
import certify
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
    assert len(rows) == 41 and rows[0].startswith("index,label,prediction,correct,certified_1,margin_1")
    assert (out / "summary.md").read_text().startswith("# Certification report")
    # the report's numbers are the library's numbers
    model, _ = bagcert.load_checkpoint(tiny_checkpoint)
    data = bagcert.data.load_dataset("synthetic:40", "test")
    direct = bagcert.certify(model, data.float_images(), data.labels, patch_size=(3, 7))
    assert res["certified_count"]["3x7"] == int(direct.certified_correct.sum())
    assert [int(r.split(",")[-4]) for r in rows[1:]] == direct.certified.int().tolist()


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
    with pytest.raises((SystemExit, ValueError), match=match):
        certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--output", str(tmp_path), "--no-progress"] + argv)


def test_certify_foreign_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(bagcert.CheckpointError):
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
