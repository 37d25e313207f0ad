"""Paired comparison of two reports: bagcert.metrics.paired_difference and benchmarks/compare_reports.py."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from bagcert.metrics import paired_difference

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_reports", ROOT / "benchmarks" / "compare_reports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_difference_counts_the_discordant_images():
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 0, 1, 1, 1, 1, 1, 0]
    r = paired_difference(a, torch.tensor(b, dtype=torch.bool))
    assert (r["n"], r["a_only"], r["b_only"]) == (8, 2, 3)
    assert r["accuracy_a"] == 5 / 8 and r["accuracy_b"] == 6 / 8
    assert r["difference"] == pytest.approx(1 / 8)
    half = 1.959963984540054 * math.sqrt(2 + 3 - 8 * (1 / 8) ** 2) / 8
    assert r["ci95"] == pytest.approx((1 / 8 - half, 1 / 8 + half))
    assert r["p_value"] == pytest.approx(binomtest(3, 5, 0.5).pvalue)
    swapped = paired_difference(b, a)
    assert swapped["difference"] == pytest.approx(-r["difference"]) and swapped["p_value"] == r["p_value"]


def test_paired_difference_is_a_function_of_the_pairs_alone():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 500)
    b = np.where(rng.random(500) < 0.9, a, 1 - a)
    perm = rng.permutation(500)
    assert paired_difference(a, b) == paired_difference(a[perm], b[perm])
    same = paired_difference(a, a)
    assert same["difference"] == 0.0 and same["ci95"] == (0.0, 0.0) and same["p_value"] == 1.0


def test_paired_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        paired_difference([1, 2], [1, 0])
    with pytest.raises(ValueError, match="1-D"):
        paired_difference([[1, 0]], [[1, 0]])


def _write(path, labels, correct, cert, source=None):
    path.mkdir()
    head = "index,label,prediction,correct,certified_5" + (",source" if source else "")
    rows = [f"{i},{l},{l if c else (l + 1) % 10},{c},{z}" + (f",{source[i]}" if source else "")
            for i, (l, c, z) in enumerate(zip(labels, correct, cert))]
    (path / "per_sample.csv").write_text("\n".join([head, *rows]) + "\n")
    return path


def test_compare_reports_pairs_rows_and_refuses_other_images(tmp_path, capsys):
    mod = _script()
    labels = [0, 1, 2, 3, 4, 5]
    a = _write(tmp_path / "a", labels, [1, 1, 1, 0, 0, 1], [1, 0, 1, 0, 1, 1])
    b = _write(tmp_path / "b", labels, [1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0])
    rows = mod.compare(a, b / "per_sample.csv")
    assert [r["metric"] for r in rows] == ["clean", "certified 5"]
    # certified counts only where also correct: A 1,0,1,0,0,1 ; B 1,1,0,1,0,0
    assert (rows[1]["a_only"], rows[1]["b_only"]) == (2, 2) and rows[1]["difference"] == 0.0
    assert mod.main([str(a), str(b), "--names", "old", "new"]) == 0
    out = capsys.readouterr().out
    assert "| clean | 66.67 | 83.33 | +16.67" in out and "old only" in out
    other = _write(tmp_path / "c", [0, 1, 2, 3, 4, 6], [1] * 6, [1] * 6)
    with pytest.raises(SystemExit, match="row 5 is not the same image"):
        mod.compare(a, other)
    short = _write(tmp_path / "d", labels[:5], [1] * 5, [1] * 5)
    with pytest.raises(SystemExit, match="6 images and"):
        mod.compare(a, short)
    with pytest.raises(SystemExit, match="no per_sample.csv"):
        mod.compare(a, tmp_path)


def test_compare_reports_refuses_broken_files_with_one_line(tmp_path, capsys):
    mod = _script()
    labels = [0, 1, 2]
    a = _write(tmp_path / "a", labels, [1, 1, 0], [1, 0, 0])
    head = "index,label,prediction,correct,certified_5\n"
    short = tmp_path / "short.csv"  # a row cut short: its certified_5 is missing
    short.write_text(head + "0,0,0,1,1\n1,1,1,1\n2,2,3,0,0\n")
    word = tmp_path / "word.csv"
    word.write_text(head + "0,0,0,True,1\n1,1,1,1,0\n2,2,3,0,0\n")
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x80\x81\xff\xfe" * 20)
    cases = [(short, "row 1 has certified_5=None; expected 0 or 1"), (word, "row 0 has correct='True'; expected 0 or 1"),
             (binary, "cannot be read as a CSV file"), (tmp_path / "missing", "no such file or folder")]
    for path, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            mod.main([str(a), str(path)])
        assert "\n" not in str(e.value.code) and str(path) in str(e.value.code)


def test_compare_reports_checks_dataset_index_where_both_record_it(tmp_path):
    mod = _script()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("index,dataset_index,label,correct\n0,10,3,1\n1,11,3,0\n")
    b.write_text("index,dataset_index,label,correct\n0,10,3,1\n1,12,3,1\n")  # same labels, other images
    with pytest.raises(SystemExit, match=r"row 1 is not the same image in both reports \(dataset_index 11 / 12\)"):
        mod.compare(a, b)


def test_compare_reports_names_the_patch_sizes_it_leaves_out(tmp_path, capsys):
    mod = _script()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("index,label,correct,certified_3,certified_5\n0,3,1,1,0\n1,4,1,1,1\n")
    b.write_text("index,label,correct,certified_5,certified_7\n0,3,1,1,0\n1,4,0,0,0\n")
    assert [r["metric"] for r in mod.compare(a, b)] == ["clean", "certified 5"]
    err = capsys.readouterr().err
    assert f"patch sizes only in {a}, not compared: 3" in err and f"patch sizes only in {b}, not compared: 7" in err
