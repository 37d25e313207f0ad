"""certify.py and an image the stream path cannot decode: one line naming the file, or (--skip-bad-images) a report
of the other images that lists the skipped file."""

import csv
import io
import json
import shutil

import pytest
import torch
from PIL import Image

import bagcert
from bagcert.cli import certify


@pytest.fixture
def folder_and_model(tmp_path):
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "test" / c).mkdir(parents=True)
        for i in range(5):
            img = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(img).save(root / "test" / c / f"{i}.png")
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=2, width=8).eval()
    ckpt = bagcert.save_checkpoint(tmp_path / "m.pt", model, input_size=32, resize=32, classes=["a", "b"])
    return root, ckpt


def _argv(ckpt, root, out, *extra):
    return ["--checkpoint", str(ckpt), "--dataset", str(root), "--patch-sizes", "2,3", "--output", str(out), "--quiet",
            "--no-progress", *extra]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_undecodable_file_on_the_stream_path_is_one_line_naming_it(folder_and_model, tmp_path, workers):
    root, ckpt = folder_and_model
    (root / "test" / "b" / "3.png").write_bytes(b"not an image")
    out = tmp_path / "rep"
    with pytest.raises(SystemExit, match=r"^.*test/b/3\.png cannot be decoded as an image .*; no report was written: "
                                         r".* --skip-bad-images") as e:
        certify.main(_argv(ckpt, root, out, "--data-path", "stream", "--workers", workers))
    assert "\n" not in e.value.code and not out.exists()


def test_skip_bad_images_certifies_the_others_and_the_report_lists_the_skipped_file(folder_and_model, tmp_path, capsys):
    root, ckpt = folder_and_model
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    (clean / "test" / "b" / "3.png").unlink()
    assert certify.main(_argv(ckpt, clean, tmp_path / "ref", "--data-path", "stream")) == 0
    (root / "test" / "b" / "3.png").write_bytes(b"not an image")
    out = tmp_path / "rep"
    assert certify.main(_argv(ckpt, root, out, "--skip-bad-images")) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    doc = json.loads((out / "results.json").read_text())
    skipped = doc["dataset"]["skipped_images"]
    assert skipped["count"] == 1 and skipped["files"] == ["b/3.png"] and skipped["dataset_index"] == [8]
    assert "cannot be decoded" in skipped["errors"][0] and doc["config"]["skip_bad_images"] is True
    # the numbers are those of the folder without the file: the stand-in image is in no count
    assert doc["num_images"] == ref["num_images"] == 9
    for key in ("correct_count", "certified_count", "clean_accuracy", "certified_accuracy"):
        assert doc[key] == ref[key], key
    rows = list(csv.DictReader(io.StringIO((out / "per_sample.csv").read_text())))
    assert len(rows) == 9 and "b/3.png" not in [r["source"] for r in rows]
    assert "skipped (--skip-bad-images): 1 image(s)" in (out / "summary.md").read_text()


def test_skip_bad_images_refusals(folder_and_model, tmp_path):
    root, ckpt = folder_and_model
    for extra, match in ((["--data-path", "memory"], "leave --data-path at auto or stream"),
                         (["--attacks", "pgd"], "--attacks need them in memory")):
        with pytest.raises(SystemExit, match=match):
            certify.main(_argv(ckpt, root, tmp_path / "x", "--skip-bad-images", *extra))
