#!/usr/bin/env python3
"""Certification speed: the inference-optimised evaluation (bagcert.inference) against the module as shipped.

Four variants side by side in ONE run, repeats interleaved (a, b, c, d, a, b, c, d, ...), the median time of each:

  (a) forward_shipped: the plain float32 NCHW forward of the trained module (batch norm unfused, the dense model
      with its dilated convolutions), ``model.local_logits`` on batches of --batch-size images: no certificate.
  (b) certify_shipped: certification as it ran before bagcert.inference: (a) followed by
      ``certify_logits`` for the patch sizes, per batch.
  (c) certify_fp32: ``bagcert.certify(..., batch_size=--batch-size)``: batch norm folded, space-to-batch for
      dilated convolutions, channels_last, fixed-size chunks.
  (d) certify_bf16: (c) with ``precision="bf16"`` (bf16 autocast).

For each: images/s, GFLOP/s (FLOPs of one forward pass of the module per image, counted with
``torch.utils.flop_counter.FlopCounterMode``; the same count for every variant, so GFLOP/s compare work done per
second), and the ratio to (a) and (b). It also counts the images whose prediction or certificate differs from (b)
(any of prediction, certified flag, margin; and prediction or certified flag alone). fp32: only votes at a logit
within ~1e-5 of 0 may flip; bf16 certifies the bf16-evaluated model, so its margins differ. Writes JSON.

    python benchmarks/certify_speed.py --threads 2 --num-images 1000 --repeats 5 --output docs/results/certify_speed.json

Run it alone on the machine: other jobs change the absolute numbers and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bagcert  # noqa: E402
from bagcert.certification import certify_logits  # noqa: E402
from bagcert.report import environment_info  # noqa: E402

SIZES = [1, 2, 3, 4, 5, 6, 7, 8, (3, 7), (7, 3), (2, 8), (8, 2)]


def flops_per_image(model, image_size) -> float:
    """FLOPs of one forward pass of ``model`` per image (FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 3, *image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.local_logits(x)
    return counter.get_total_flops() / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "bagcert_cifar10_r5s2_dense.pt"))
    shared = [ROOT.parent / "shared" / "data" / "cifar10", ROOT.parent.parent / "shared" / "data" / "cifar10"]
    default_data = next((d for d in shared if d.is_dir()), ROOT / "samples" / "cifar10")
    p.add_argument("--dataset", default=str(default_data), help="CIFAR-10 folder (default: the shared test set, else the samples)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250, help="images per batch (the CLI's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", help="write the JSON here (e.g. docs/results/certify_speed.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = bagcert.load_checkpoint(args.checkpoint)
    model.eval()
    from bagcert.data import load_dataset

    data = load_dataset(args.dataset, "test", size=int(meta.get("input_size", 32)))
    n = min(args.num_images, len(data))
    x, y = data.images[:n].float().div_(255.0), data.labels[:n]
    image_size = tuple(x.shape[-2:])
    bs = args.batch_size

    def forward_shipped():
        with torch.no_grad():
            return [model.local_logits(x[i : i + bs]) for i in range(0, n, bs)]

    def certify_shipped():
        out = []
        with torch.no_grad():
            for i in range(0, n, bs):
                z = model.local_logits(x[i : i + bs])
                out.append(certify_logits(z, y[i : i + bs], model.geometry, image_size, patch_sizes=SIZES))
        return {k: bagcert.CertResult.concat([o[k] for o in out]) for k in out[0]}

    variants = {
        "forward_shipped": forward_shipped,
        "certify_shipped": certify_shipped,
        "certify_fp32": lambda: bagcert.certify(model, x, y, patch_sizes=SIZES, batch_size=bs),
        "certify_bf16": lambda: bagcert.certify(model, x, y, patch_sizes=SIZES, batch_size=bs, precision="bf16"),
    }
    results = {name: fn() for name, fn in variants.items()}  # warm-up (fused copies built, kernels chosen)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flops = flops_per_image(model, image_size)
    from bagcert.inference import chunk_size, inference_copy

    flops_fused = flops_per_image(inference_copy(model), image_size)
    ref = results["certify_shipped"]

    def differing(res, fields=("prediction", "certified", "margin")) -> int:
        d = torch.zeros(n, dtype=torch.bool)
        for k in ref:
            for f in fields:
                d |= getattr(res[k], f) != getattr(ref[k], f)
        return int(d.sum())

    rows = {}
    for name in variants:
        med = statistics.median(times[name])
        rows[name] = {"median_s": med, "images_per_s": n / med, "gflop_per_s": n * flops / med / 1e9, "times_s": times[name]}
    for name, row in rows.items():
        row["speedup_vs_forward_shipped"] = rows["forward_shipped"]["median_s"] / row["median_s"]
        row["speedup_vs_certify_shipped"] = rows["certify_shipped"]["median_s"] / row["median_s"]
        if name.startswith("certify_") and name != "certify_shipped":
            row["images_differing_from_shipped"] = differing(results[name])  # prediction, certified flag or margin
            row["predictions_or_certified_differing_from_shipped"] = differing(results[name], ("prediction", "certified"))
    res = {
        "env": environment_info(),
        "threads": torch.get_num_threads(),
        "checkpoint": str(args.checkpoint),
        "model": model.config,
        "dataset": str(args.dataset),
        "num_images": n,
        "batch_size": bs,
        "chunk_size": chunk_size(model, image_size),
        "patch_sizes": [s if isinstance(s, int) else f"{s[0]}x{s[1]}" for s in SIZES],
        "repeats": args.repeats,
        "mflop_per_image": flops / 1e6,
        "mflop_per_image_fused": flops_fused / 1e6,
        "variants": rows,
    }
    print(f"{n} images, {len(SIZES)} patch sizes, {flops / 1e6:.0f} MFLOP/image, {torch.get_num_threads()} threads")
    print(f"{'variant':<18}{'img/s':>10}{'GFLOP/s':>10}{'x (a)':>8}{'x (b)':>8}{'differ':>8}")
    for name, row in rows.items():
        print(f"{name:<18}{row['images_per_s']:>10.1f}{row['gflop_per_s']:>10.1f}{row['speedup_vs_forward_shipped']:>8.2f}"
              f"{row['speedup_vs_certify_shipped']:>8.2f}{row.get('images_differing_from_shipped', ''):>8}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
