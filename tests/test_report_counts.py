"""results.json stores counts and the fractions computed from them in double precision (112 / 200 is 0.56, not the
float32 value 0.5600000023841858)."""

import json

import pytest

import torch

from bagcert.certification import CertResult
from bagcert.cli import certify
from bagcert.report import write_certification_report


def _result(n, correct, certified):
    flags = lambda k: torch.arange(n) < k  # noqa: E731
    label = torch.zeros(n, dtype=torch.long)
    return CertResult(prediction=torch.where(flags(correct), 0, 1), label=label, correct=flags(correct),
                      certified=flags(certified), margin=torch.where(flags(certified), 1, -1), worst_position=torch.zeros(n, 2, dtype=torch.long),
                      patch_size=(5, 5), aggregation="votes")


def test_cert_result_fractions_are_counts_divided_in_double_precision():
    r = _result(200, 112, 67)
    assert r.clean_accuracy == 0.56 == 112 / 200 and r.certified_accuracy == 67 / 200
    assert float(torch.tensor([True] * 112 + [False] * 88).float().mean()) != 0.56  # what float32 would have stored


def test_results_json_stores_counts_and_exact_fractions(tmp_path):
    results = {"5": _result(200, 112, 67), "3x7": _result(200, 112, 1)}
    timing = {"forward_s": 1.0, "certify_s": 0.5, "total_s": 1.5}
    write_certification_report(tmp_path, results, timing, {}, {"name": "synthetic", "root": None, "split": "test"}, None)
    text = (tmp_path / "results.json").read_text()
    doc = json.loads(text)
    assert doc["correct_count"] == 112 and doc["num_images"] == 200 and doc["clean_accuracy"] == 0.56
    assert doc["certified_count"] == {"5": 67, "3x7": 1}
    assert doc["certified_accuracy"] == {"5": 67 / 200, "3x7": 1 / 200} == {"5": 0.335, "3x7": 0.005}
    assert "0.5600000" not in text


def test_certify_cli_fractions_equal_counts_over_images(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "rep"
    assert certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:30", "--patch-sizes", "1,3",
                         "--output", str(out), "--quiet", "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    n = doc["num_images"]
    assert doc["clean_accuracy"] == doc["correct_count"] / n
    assert all(doc["certified_accuracy"][k] == doc["certified_count"][k] / n for k in ("1", "3"))


def test_overwrite_refuses_a_report_folder_holding_files_bagcert_did_not_write(tiny_checkpoint, tmp_path, capsys):
    from bagcert.report import foreign_files

    out = tmp_path / "rep"
    argv = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:6", "--patch-sizes", "2", "--quiet", "--no-progress"]
    assert certify.main(argv + ["--output", str(out)]) == 0
    assert foreign_files(out) == []
    (out / "notes.txt").write_text("my notes about this run")
    (out / "extra").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match=r"holds a report and files bagcert did not write \(extra, notes.txt\); replacing "
                                         r"the report would delete them") as e:
        certify.main(argv + ["--output", str(out), "--overwrite"])
    assert "\n" not in e.value.code
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and (out / "extra").is_dir()
    (out / "notes.txt").unlink()
    (out / "extra").rmdir()
    assert certify.main(argv + ["--output", str(out), "--overwrite"]) == 0  # the report's own files are replaced
