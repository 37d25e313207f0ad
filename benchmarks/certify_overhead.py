#!/usr/bin/env python3
"""Cost of the certificate relative to the forward pass.

Median over interleaved repetitions of time(forward + certificate) / time(forward) on the same batch,
for one patch size and for eight sizes at once. Target: <= 1.05 (one size), <= 1.15 (eight sizes) on a CPU,
<= 1.1 (one size) on a GPU.

On a GPU (``--device cuda``) the certificate is timed the way ``bagcert certify`` runs it there: the model's input
check off (the images are the toolkit's own), ``certify_logits(..., check_finite=False)``, CUDA events around each
region, and with ``--sync-debug`` the certificate runs under ``torch.cuda.set_sync_debug_mode("error")``, so any
host synchronisation inside it fails the run (``sync_free`` in the JSON).

    python benchmarks/certify_overhead.py --checkpoint checkpoints/bagcert_cifar10_r9s2.pt --batch-size 500
    python benchmarks/certify_overhead.py --device cuda --sync-debug --batch-size 1000
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: fail if the certificate synchronises with the host")
    args = p.parse_args(argv)
    if args.device != "cpu":
        return _main_device(args)
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


def _main_device(args) -> int:
    """Forward pass against certificate on an accelerator, timed with CUDA events (see the module docstring)."""
    from bagcert.certification import certify_logits

    dev = torch.device(args.device)
    if args.model:
        model = bagcert.create_model(args.model)
    else:
        model, meta = bagcert.load_checkpoint(args.checkpoint)
        args.image_size = int(meta.get("input_size", args.image_size))
    model = model.to(dev).eval()
    model.check_inputs = False
    size = (args.image_size, args.image_size)
    x = torch.rand(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(dev)
    y = torch.zeros(args.batch_size, dtype=torch.long)
    one = [5] if args.image_size < 64 else [max(1, round(32 * args.image_size / 224))]
    eight = list(range(1, 9)) if args.image_size < 64 else sorted({max(1, round(v * args.image_size / 224)) for v in (8, 16, 23, 32, 39, 48, 56, 64)})

    def timed(fn):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        return out, a.elapsed_time(b) / 1000

    ratios = {"one_size": [], "eight_sizes": []}
    with torch.no_grad():
        z = model.local_logits(x)
        certify_logits(z, y, model.geometry, size, patch_sizes=eight, check_finite=False)  # warm-up, tables built
        torch.cuda.synchronize()
        sync_free = None
        if args.sync_debug:
            torch.cuda.set_sync_debug_mode("error")
            try:
                certify_logits(z, y, model.geometry, size, patch_sizes=eight, check_finite=False)
                sync_free = True
            except RuntimeError as e:
                sync_free = False
                print(f"the certificate synchronised with the host: {e}", file=sys.stderr)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for _ in range(args.repeats):
            z, t_fwd = timed(lambda: model.local_logits(x))
            _, t_one = timed(lambda: certify_logits(z, y, model.geometry, size, patch_size=one[0], check_finite=False))
            _, t_eight = timed(lambda: certify_logits(z, y, model.geometry, size, patch_sizes=eight, check_finite=False))
            ratios["one_size"].append((t_fwd + t_one) / t_fwd)
            ratios["eight_sizes"].append((t_fwd + t_eight) / t_fwd)
    res = {"env": environment_info(args.device), "model": model.config, "batch_size": args.batch_size, "image_size": args.image_size,
           "sizes_one": one, "sizes_eight": eight, "median_ratio_one_size": statistics.median(ratios["one_size"]),
           "median_ratio_eight_sizes": statistics.median(ratios["eight_sizes"]), "repeats": args.repeats, "sync_free": sync_free}
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if sync_free is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
