#!/usr/bin/env python3
"""Where the training step's time goes, and what makes the shipped recipe faster per image.

Times one full training step (forward, the recipe's certified loss, backward, AdamW step) of the shipped
bagcert-cifar10-r5 (v2) recipe (``cifar_bagnet5_s2`` width 128, bf16 autocast, channels_last, batch 128,
``margin_reduce="mean"``, ``bce_pos_weight=3``) and of variants that change one thing at a time. Variants are
interleaved round-robin and the median over rounds is reported as images/s and as a ratio to the recipe, so every
ratio comes from one run on one machine. Measure with nothing else running: a neighbouring job changes the ratios.

    python benchmarks/train_speed_variants.py --threads 2 --rounds 5 --output docs/results/train_speed_variants.json
    python benchmarks/train_speed_variants.py --threads 2 --compile      # also torch.compile of the model
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
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.report import environment_info  # noqa: E402

RECIPE = {"norm": "bn", "amp": True, "channels_last": True, "batch": 128, "compile": False}
VARIANTS = {
    "recipe (bn, bf16, channels_last, batch 128)": {},
    "fp32": {"amp": False},
    "no channels_last": {"channels_last": False},
    "group norm": {"norm": "gn"},
    "skipinit (no normalisation)": {"norm": "skipinit"},
    "batch 256": {"batch": 256},
    "batch 512": {"batch": 512},
    "skipinit, batch 256": {"norm": "skipinit", "batch": 256},
}


def make_step(setting: dict, width: int):
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", width=width, norm=setting["norm"]).train()
    fmt = torch.channels_last if setting["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    fwd = torch.compile(model.local_logits) if setting["compile"] else model.local_logits
    loss_fn = BagCertLoss(model.geometry, (32, 32), [5], tau=1.0, kappa=0.25, margin_reduce="mean", bce_pos_weight=3.0)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(setting["batch"], 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (setting["batch"],), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["amp"]):
            z = fwd(x)
        loss, _ = loss_fn(z.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images-per-round", type=int, default=1024, help="images timed per variant and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (compilation is not timed)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.images_per_round < 1 or args.threads < 1:
        raise SystemExit("--rounds, --images-per-round and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    variants = dict(VARIANTS)
    if args.compile:
        variants["torch.compile"] = {"compile": True}
        variants["torch.compile, skipinit"] = {"compile": True, "norm": "skipinit"}
    settings = {name: dict(RECIPE, **change) for name, change in variants.items()}
    steps = {name: make_step(s, args.width) for name, s in settings.items()}
    for name, step in steps.items():  # warm-up (and compilation) outside the timed rounds
        step()
        step()
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            n = max(1, args.images_per_round // settings[name]["batch"])
            t = time.perf_counter()
            for _ in range(n):
                step()
            rates[name].append(n * settings[name]["batch"] / (time.perf_counter() - t))
    base = statistics.median(rates[next(iter(rates))])
    rows = {name: {"setting": settings[name], "images_per_s": statistics.median(r), "ratio_to_recipe": statistics.median(r) / base,
                   "rounds": r} for name, r in rates.items()}
    out = {"env": environment_info(), "threads": args.threads, "width": args.width, "rounds": args.rounds, "variants": rows}
    for name, row in rows.items():
        print(f"{name:45s} {row['images_per_s']:8.1f} img/s  {row['ratio_to_recipe']:.2f}x")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
