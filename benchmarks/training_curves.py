#!/usr/bin/env python3
"""Side-by-side evaluation curves of training runs, read from their ``train_log.jsonl`` files.

Each run evaluates its held-out images every few epochs (``--eval-every``); this prints, for every epoch at which
at least one run evaluated, each run's metric and the wall time it had spent until then, as a markdown table. It
compares runs at equal epochs (does a change learn faster per epoch?) and at equal time (the ``min`` columns).

    python benchmarks/training_curves.py --metric certified_5 \\
        rf5_w128=checkpoints/bagcert_cifar10_r5s2/train_log.jsonl \\
        rf9_w128=checkpoints/bagcert_cifar10_r9s2/bf16_34ep/train_log.jsonl

Runs resumed with another ``--epochs`` log each evaluation once; a run that was resumed from an earlier
checkpoint and repeated steps keeps the last record per epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_evals(path) -> dict[float, dict]:
    """{epoch: {"wall_seconds": s, metric: value, ...}} from a train_log.jsonl (the last record per epoch wins)."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg}); expected a bagcert train_log.jsonl") from None
            if "eval" in rec:
                out[round(float(rec["epoch"]), 2)] = {"wall_seconds": float(rec["wall_seconds"]), **rec["eval"]}
    if not out:
        raise SystemExit(f"{path} has no evaluation records (train.py writes them every --eval-every epochs)")
    return out


def table(runs: dict[str, dict[float, dict]], metric: str, every: float | None = None) -> str:
    for name, evals in runs.items():
        if not any(metric in e for e in evals.values()):
            have = sorted({k for e in evals.values() for k in e if k not in ("n", "wall_seconds")})
            raise SystemExit(f"run {name} has no metric {metric!r}; its evaluations have {have}")
    epochs = sorted({ep for evals in runs.values() for ep in evals})
    if every:
        epochs = [ep for ep in epochs if abs(ep / every - round(ep / every)) < 1e-6]
    head = "| epoch | " + " | ".join(f"{name} % | {name} min" for name in runs) + " |"
    sep = "| ---: | " + " | ".join("---: | ---:" for _ in runs) + " |"
    rows = [head, sep]
    for ep in epochs:
        cells = []
        for evals in runs.values():
            e = evals.get(ep)
            cells.append("|" if e is None or metric not in e else f"{100 * e[metric]:.1f} | {e['wall_seconds'] / 60:.0f}")
        rows.append(f"| {ep:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=path/to/train_log.jsonl (or a run folder holding one)")
    p.add_argument("--metric", action="append", help="clean_accuracy, certified_5, ... (repeatable; default both of those)")
    p.add_argument("--every", type=float, help="only epochs that are multiples of this")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"run {spec!r}: expected NAME=path/to/train_log.jsonl")
        path = Path(path)
        if path.is_dir():
            path = path / "train_log.jsonl"
        if not path.is_file():
            raise SystemExit(f"run {name}: {path} does not exist")
        runs[name] = read_evals(path)
    for metric in args.metric or ["clean_accuracy", "certified_5"]:
        print(f"\n{metric} (held-out images evaluated during training; min = wall minutes until then)\n")
        print(table(runs, metric, args.every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
