"""What does the double-masking training loss cost next to BagCertLoss?

Times forward + backward of ``DoubleMaskingLoss`` (``--loss masking``; greedy and all pairs, clipped logits) and
of ``BagCertLoss`` (the recipe's settings: margin_reduce "mean", bce_pos_weight 3) on the same random local logits
[batch, classes, h, w] (default 128 x 10 x 16 x 16: the CIFAR-10 recipe's training map, 144 masks of 5 x 5
locations for 5 x 5 patches), and reports milliseconds per call and each loss's ratio to BagCertLoss. The model's
forward and backward pass, which dominates a training step, is not included. Each timing is the best of
``--repeats`` runs of ``--calls`` calls. Time it alone on the machine: with other jobs on the cores the numbers
mean little.

    python benchmarks/masking_loss_cost.py --threads 2 --output docs/results/masking_loss_cost.json
    python benchmarks/masking_loss_cost.py --device cuda

Smoke test: ``--batch 8 --calls 1 --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bagcert  # noqa: E402
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.losses_masking import DoubleMaskingLoss  # noqa: E402


def _time(fn, z, y, calls, repeats, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn(z, y)[0].backward()  # warm-up (caches, allocator)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            z.grad = None
            fn(z, y)[0].backward()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--model", default="cifar_bagnet5_s2", help="its geometry sets the map (default 16x16 for 32 px)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    geometry = bagcert.create_model(a.model, num_classes=a.classes, width=8).geometry
    size = (a.image_size, a.image_size)
    h, w = geometry.grid_size(*size)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(a.batch, a.classes, h, w, generator=g) * 2).to(device).requires_grad_(True)
    y = torch.randint(0, a.classes, (a.batch,), generator=g).to(device)
    losses = {
        "bagcert": BagCertLoss(geometry, size, [a.patch_size], tau=2.0, margin_weight=5.0, ce_weight=1.0,
                               bce_pos_weight=3.0, margin_reduce="mean"),
        "masking_greedy": DoubleMaskingLoss(geometry, size, [a.patch_size], pairs="greedy", margin_weight=5.0, bce_pos_weight=3.0),
        "masking_all": DoubleMaskingLoss(geometry, size, [a.patch_size], pairs="all", margin_weight=5.0, bce_pos_weight=3.0),
    }
    ms = losses["masking_greedy"].mask_sets[0]
    res = {name: _time(fn, z, y, a.calls, a.repeats, device) for name, fn in losses.items()}
    report = {
        "map": [h, w], "batch": a.batch, "classes": a.classes, "num_masks": ms.num_masks, "mask_size": list(ms.mask_size),
        "ms_per_call": {k: round(v * 1e3, 3) for k, v in res.items()},
        "ratio_to_bagcert": {k: round(v / res["bagcert"], 2) for k, v in res.items()},
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))
    if a.output:
        atomic_write_text(Path(a.output), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
