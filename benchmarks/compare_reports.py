#!/usr/bin/env python3
"""Two certification reports of the same images, compared image by image.

Two models certified on the same test set differ by a point or so; whether that is more than chance is decided
by the images on which they disagree, not by the two reports' separate confidence intervals (which overlap even
for real differences). For clean accuracy and each patch size the two reports share, this prints both
accuracies, the difference B - A with its paired 95 % interval, the discordant counts and McNemar's exact
p-value (:func:`bagcert.metrics.paired_difference`). The interval covers other images of the same distribution,
not other training runs: a second seed of one model is the yardstick for that.

    python benchmarks/compare_reports.py checkpoints/bagcert_cifar10_r5s2_v2/report \\
        checkpoints/cifar10_skipinit_study/nf_fast_92/report --names v2 nf

A and B are report folders (or their ``per_sample.csv``) written by ``certify.py``; row i must be the same image in
both (same label, and the same ``dataset_index`` and ``source`` where both files record them), otherwise nothing
is printed. A missing path, a file that is not such a CSV, or a value other than 0/1 in ``correct`` or a
``certified_*`` column ends with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_rows(path) -> tuple[Path, list[dict]]:
    """The rows of a report's per_sample.csv (``path`` is the file or its report folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "per_sample.csv"
    if not p.is_file():
        what = "no such file or folder" if not Path(path).exists() else "no per_sample.csv"
        raise SystemExit(f"{path}: {what}; expected a report folder written by certify.py or its per_sample.csv")
    try:
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"{p}: cannot be read as a CSV file ({type(e).__name__}); expected a certify.py per_sample.csv")
    if not rows or "correct" not in rows[0] or "label" not in rows[0]:
        raise SystemExit(f"{p}: no rows with 'label' and 'correct' columns; expected a certify.py per_sample.csv")
    return p, rows


def _check_same_images(pa, a, pb, b) -> None:
    if len(a) != len(b):
        raise SystemExit(f"{pa} has {len(a)} images and {pb} {len(b)}; the reports must cover the same images")
    for i, (ra, rb) in enumerate(zip(a, b)):
        keys = ["label"] + [k for k in ("dataset_index", "source") if k in ra and k in rb]
        bad = next((k for k in keys if ra[k] != rb[k]), None)
        if bad is not None:
            what = f"{bad} {ra[bad]} / {rb[bad]}"
            raise SystemExit(f"row {i} is not the same image in both reports ({what}); certify both on the same "
                             "dataset, split and --num-images")


def _column(path, rows, column: str) -> list[int]:
    """The 0/1 values of ``column`` in every row; one line and exit 1 for anything else."""
    out = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value not in ("0", "1"):
            raise SystemExit(f"{path}: row {i} has {column}={value!r}; expected 0 or 1 as certify.py writes it")
        out.append(int(value))
    return out


def _sizes(row: dict) -> list[str]:
    return [k[len("certified_"):] for k in row if k.startswith("certified_")]


def compare(path_a, path_b) -> list[dict]:
    """One dict per metric (``clean``, then each shared patch size in report order) with
    :func:`bagcert.metrics.paired_difference`'s fields and ``metric``; sizes in one report only are named on stderr."""
    from bagcert.metrics import paired_difference

    pa, a = read_rows(path_a)
    pb, b = read_rows(path_b)
    _check_same_images(pa, a, pb, b)
    sizes_a, sizes_b = _sizes(a[0]), _sizes(b[0])
    for p, alone in ((pa, [s for s in sizes_a if s not in sizes_b]), (pb, [s for s in sizes_b if s not in sizes_a])):
        if alone:  # said, not silently dropped: the table then shows fewer sizes than either report holds
            print(f"patch sizes only in {p}, not compared: {', '.join(alone)}", file=sys.stderr)
    correct_a, correct_b = _column(pa, a, "correct"), _column(pb, b, "correct")
    out = [{"metric": "clean", **paired_difference(correct_a, correct_b)}]
    for size in (s for s in sizes_a if s in sizes_b):  # certified and correct
        hits_a = [c * z for c, z in zip(correct_a, _column(pa, a, f"certified_{size}"))]
        hits_b = [c * z for c, z in zip(correct_b, _column(pb, b, f"certified_{size}"))]
        out.append({"metric": f"certified {size}", **paired_difference(hits_a, hits_b)})
    return out


def markdown(rows: list[dict], name_a: str, name_b: str) -> str:
    lines = [f"| metric | {name_a} % | {name_b} % | {name_b} - {name_a} (paired 95 % CI), points | {name_a} only | "
             f"{name_b} only | McNemar p |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['metric']} | {100 * r['accuracy_a']:.2f} | {100 * r['accuracy_b']:.2f} | "
                     f"{100 * r['difference']:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}) | {r['a_only']} | "
                     f"{r['b_only']} | {r['p_value']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_a", help="report folder (or per_sample.csv) of model A")
    ap.add_argument("report_b", help="report folder (or per_sample.csv) of model B, the same images")
    ap.add_argument("--names", nargs=2, default=["A", "B"], metavar=("A", "B"), help="column names for the table")
    args = ap.parse_args(argv)
    rows = compare(args.report_a, args.report_b)
    print(f"{rows[0]['n']} images, paired by row\n")
    print(markdown(rows, *args.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
