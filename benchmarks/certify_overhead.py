#!/usr/bin/env python3
"""Cost of the certificate relative to the forward pass.

Median over interleaved repetitions of time(forward + certificate) / time(forward) on the same batch,
for one patch size and for eight sizes at once. Target: <= 1.05 (one size), <= 1.15 (eight sizes).

    python benchmarks/certify_overhead.py --checkpoint checkpoints/bagcert_cifar10_r9s2.pt --batch-size 500
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bagcert  # noqa: E402
from bagcert.report import environment_info  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/bagcert_cifar10_r9s2.pt")
    p.add_argument("--model", help="registry name instead of a checkpoint (random weights)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--output", help="write JSON here")
    args = p.parse_args(argv)
    if args.model:
        model = bagcert.create_model(args.model).eval()
    else:
        model, meta = bagcert.load_checkpoint(args.checkpoint)
        args.image_size = int(meta.get("input_size", args.image_size))
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(args.batch_size, dtype=torch.long)
    one = [5]
    eight = [1, 2, 3, 4, 5, 6, 7, 8]
    if args.image_size >= 64:
        s = args.image_size / 224
        one = [max(1, round(32 * s))]
        eight = sorted({max(1, round(v * s)) for v in (8, 16, 23, 32, 39, 48, 56, 64)})
    ratios = {"one_size": [], "eight_sizes": []}
    with torch.no_grad():
        model.local_logits(x)  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.local_logits(x)
            t_fwd = time.perf_counter() - t
            t = time.perf_counter()
            bagcert.certify(model, x, y, patch_size=one[0])
            t_one = time.perf_counter() - t
            t = time.perf_counter()
            bagcert.certify(model, x, y, patch_sizes=eight)
            t_eight = time.perf_counter() - t
            ratios["one_size"].append(t_one / t_fwd)
            ratios["eight_sizes"].append(t_eight / t_fwd)
    res = {
        "env": environment_info(),
        "model": model.config,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "sizes_one": one,
        "sizes_eight": eight,
        "median_ratio_one_size": statistics.median(ratios["one_size"]),
        "median_ratio_eight_sizes": statistics.median(ratios["eight_sizes"]),
        "repeats": args.repeats,
    }
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
