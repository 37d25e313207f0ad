#!/usr/bin/env python3
"""Short-horizon ablation of the certified loss's terms on CIFAR-10.

Each variant trains `cifar_bagnet9_s2` (width 128, bf16 autocast, channels_last, AdamW 2e-3 with a
50-step warm-up, batch 128, seeded sampling with flips and pad-4 crops) for --steps steps and reports
clean and certified (5x5) accuracy of the vote model on every 10th CIFAR-10 test image (1,000 images).
A short horizon only ranks early training speed; it says nothing certain about long runs.

    python benchmarks/loss_ablation.py --variants mw5,mw20 --steps 150 --output docs/results/loss_ablation.json

Variants (name: margin weight, tau, BCE weight, CE weight, BCE positive weight):
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bagcert  # noqa: E402
from bagcert.data import augment_batch, load_cifar10  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.report import environment_info  # noqa: E402
from bagcert.training import evaluate  # noqa: E402

VARIANTS = {
    "bce": dict(margin_weight=0.0, tau=1.0, bce_weight=1.0, ce_weight=0.0),
    "bce+ce": dict(margin_weight=0.0, tau=1.0, bce_weight=1.0, ce_weight=1.0),
    "mw1": dict(margin_weight=1.0, tau=1.0, bce_weight=1.0, ce_weight=1.0),
    "mw5": dict(margin_weight=5.0, tau=2.0, bce_weight=1.0, ce_weight=1.0),
    "mw20": dict(margin_weight=20.0, tau=2.0, bce_weight=1.0, ce_weight=1.0),
    "mw5_pos3": dict(margin_weight=5.0, tau=2.0, bce_weight=1.0, ce_weight=1.0, bce_pos_weight=3.0),
    "margin_only": dict(margin_weight=5.0, tau=2.0, bce_weight=0.0, ce_weight=0.0),
}
__doc__ += "\n".join(f"    {k}: {v}" for k, v in VARIANTS.items())


def run(name, kw, steps, train, test, eval_every, lr=2e-3, seed=0):
    torch.manual_seed(seed)
    m = bagcert.create_model("cifar_bagnet9_s2", width=128).to(memory_format=torch.channels_last)
    m.check_inputs = False
    opt = torch.optim.AdamW(m.parameters(), lr, weight_decay=5e-4)
    lf = BagCertLoss(m.geometry, (32, 32), [5], **kw)
    g = torch.Generator().manual_seed(seed)
    t0, rows = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=g)
        x = augment_batch(train.images[idx], g).float().div(255).contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = m.local_logits(x)
        loss, _ = lf(z, train.labels[idx], margin_weight=kw["margin_weight"] * min(1.0, step / 50))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ev = evaluate(m, test, [5])
            rows.append({"variant": name, "step": step + 1, "seconds": time.time() - t0, **ev})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--variants", default="bce,bce+ce,mw1,mw5,mw20")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=75)
    p.add_argument("--output")
    args = p.parse_args(argv)
    train = load_cifar10(args.dataset, "train")
    test = load_cifar10(args.dataset, "test").subset(torch.arange(0, 10000, 10))
    rows = []
    for name in args.variants.split(","):
        rows += run(name, VARIANTS[name], args.steps, train, test, args.eval_every)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"env": environment_info(), "args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
