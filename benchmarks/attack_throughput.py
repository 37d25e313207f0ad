#!/usr/bin/env python3
"""Throughput of the empirical attacks.

* patch PGD: (image, location) pairs x steps per second -- one step is one forward and one backward pass of
  the batch of patched images (random start, no early stop, so every pair runs every step);
* ImageNet-Patch application: images per second through ``apply_patch`` (random pose per image, 224 px).

Random weights (throughput does not depend on them) and random images; the median of ``--repeats`` timed
runs after one warm-up. Prints one JSON object with the hardware (``bagcert.report.environment_info``).

    python benchmarks/attack_throughput.py                      # cifar_bagnet9_s2 (width 128), 32 px
    python benchmarks/attack_throughput.py --model cifar_bagnet5_s2 --width 32 --threads 2
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
from bagcert.attacks import PatchPGD, apply_patch  # noqa: E402
from bagcert.report import environment_info  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_bagnet9_s2", help="registry name (random weights)")
    p.add_argument("--width", type=int, help="override the model's width")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images", type=int, default=8, help="images attacked together")
    p.add_argument("--locations", type=int, default=8, help="locations per image run in one batch")
    p.add_argument("--steps", type=int, default=3, help="PGD steps per timed run")
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--apply-batch", type=int, default=64, help="images per apply_patch call (224 px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"width": args.width} if args.width else {}
    model = bagcert.create_model(args.model, num_classes=10, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, args.image_size, args.image_size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image is attacked (misclassified ones would be skipped)
    attack = PatchPGD(args.patch_size, steps=args.steps, locations=args.locations, batch_size=args.images,
                      location_chunk=args.locations, early_stop=False)
    t_pgd = _median_time(lambda: attack(model, x, y), args.repeats)
    pairs = args.images * args.locations
    # one timed call = clean forward + (steps + 1) forwards and `steps` backwards on `pairs` images + final check
    pgd = {
        "pairs": pairs,
        "steps": args.steps,
        "seconds_per_call": t_pgd,
        "pair_steps_per_s": pairs * args.steps / t_pgd,
        "note": "a call also includes the clean and final forward passes and a last un-stepped forward",
    }

    canvas = torch.zeros(3, 224, 224)
    canvas[:, 87:137, 87:137] = torch.rand(3, 50, 50, generator=g)
    mask = torch.zeros(1, 224, 224)
    mask[:, 87:137, 87:137] = 1
    imgs = torch.rand(args.apply_batch, 3, 224, 224, generator=g)
    gen = torch.Generator().manual_seed(1)
    t_apply = _median_time(lambda: apply_patch(imgs, canvas, mask, generator=gen), args.repeats)
    result = {
        "env": environment_info(),
        "model": args.model,
        "model_kwargs": kwargs,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "threads": torch.get_num_threads(),
        "pgd": pgd,
        "apply_patch": {"batch": args.apply_batch, "image_size": 224, "seconds_per_call": t_apply, "images_per_s": args.apply_batch / t_apply},
        "repeats": args.repeats,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
