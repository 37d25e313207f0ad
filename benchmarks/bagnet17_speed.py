#!/usr/bin/env python3
"""ImageNet-size speed: BagNet-17 at 224 px, certification and one training step, the data path against the model.

Four measurements, each on its own (no part waits for another), in images/s:

* ``data``: the stream data path alone (:mod:`bagcert.streaming`, what ``train.py --data-path stream`` and
  ``certify.py --data-path stream`` read): one pass of ``make_loader`` over at most ``--images`` Imagenette JPEGs
  (``--data``, shorter side 160 px) in the evaluation view (decode, shorter side to ``--resize``, centre crop
  ``--image-size``) and in the training view (decode, RandomResizedCrop ``--image-size``, flip), with
  ``--workers`` loader processes; uint8 batches, no model;
* ``certify``: the model alone, ``bagcert.certify`` (one forward pass and the certificates at ``--patch-sizes``)
  on random float images of ``--image-size`` px, eval mode, fp32 and bf16 autocast;
* ``train step``: the model alone, one training step (forward in bf16 autocast, channels_last, the bagcert loss
  with the recipe's ``margin_reduce="mean"``, backward, AdamW) on random images, in train mode;
* the ratios ``data / certify`` and ``data (training view) / train step``: above 1, the model limits; below 1,
  the data path does (more ``--workers``, or the in-memory path, would then help).

Every timing is the median of ``--rounds`` rounds after one warm-up round. Measure with nothing else running.

    python benchmarks/bagnet17_speed.py --model bagnet17 --threads 2 --workers 2 --output docs/results/bagnet17_speed.json
    python benchmarks/bagnet17_speed.py --model bagnet17_w025 --batch-size 2 --images 8 --rounds 1 --workers 0   # smoke
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
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.report import environment_info  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette" / "images-160"


def median_rate(fn, images: int, rounds: int) -> tuple[float, list]:
    """(median images/s, per-round rates) of ``fn()`` handling ``images`` images, after one warm-up call."""
    fn()
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        rates.append(images / (time.perf_counter() - t))
    return statistics.median(rates), rates


def data_rate(folder: Path, size: int, resize: int, batch: int, workers: int, limit: int, train: bool, rounds: int):
    """Images/s of one pass of the stream loader over ``limit`` images (worker start-up included), no model."""
    from bagcert.streaming import ImageFolderStream, SubsetStream, make_loader

    ds = ImageFolderStream(folder, size=size, resize=resize, augment="resized-crop" if train else "none")
    if limit < len(ds):
        ds = SubsetStream(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit])
    n = len(ds)
    epoch = [0]

    def one_pass():
        loader = make_loader(ds, batch_size=batch, train=train, seed=0, epoch=epoch[0], workers=workers)
        epoch[0] += 1
        seen = sum(b[0].shape[0] for b in loader)
        assert seen == n

    return median_rate(one_pass, n, rounds)


def certify_rate(model, size: int, batch: int, patch_sizes: list, amp: bool, rounds: int):
    """Images/s of ``bagcert.certify`` (forward pass and certificates) on random images, eval mode."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            bagcert.certify(model, x, y, patch_sizes=patch_sizes)

    return median_rate(run, batch, rounds)


def train_step_rate(model, size: int, batch: int, patch_sizes: list, rounds: int):
    """Images/s of one training step (bf16 forward, bagcert loss, backward, AdamW) on random images."""
    model = model.train().to(memory_format=torch.channels_last)
    model.check_inputs = False
    loss_fn = BagCertLoss(model.geometry, (size, size), patch_sizes, tau=2.0, margin_weight=5.0, margin_reduce="mean",
                          bce_pos_weight=3.0)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.local_logits(x)
        loss, _ = loss_fn(z, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_rate(step, batch, rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bagnet17", help="bagnet17 (ImageNet width) or bagnet17_w025 (a quarter)")
    p.add_argument("--classes", type=int, default=10, help="output classes (Imagenette: 10)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, help="shorter side before the centre crop (default: size * 256 / 224)")
    p.add_argument("--patch-sizes", default="32", help="comma-separated square patch sides for certify and the loss")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="images per pass of the data path")
    p.add_argument("--workers", type=int, default=2, help="loader processes of the data path (0: in this process)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an ImageFolder of JPEGs (Imagenette images-160)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if min(args.batch_size, args.images, args.rounds, args.threads, args.image_size) < 1 or args.workers < 0:
        raise SystemExit("--batch-size, --images, --rounds, --threads and --image-size must be >= 1, --workers >= 0")
    try:
        patch_sizes = [int(s) for s in args.patch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--patch-sizes must be comma-separated integers, got {args.patch_sizes!r}") from None
    torch.set_num_threads(args.threads)
    resize = args.resize or round(args.image_size * 256 / 224)
    torch.manual_seed(0)
    model = bagcert.create_model(args.model, num_classes=args.classes).eval()
    rows = {}
    for view, train in (("data (evaluation view)", False), ("data (training view)", True)):
        rows[view] = data_rate(args.data, args.image_size, resize, args.batch_size, args.workers, args.images, train,
                               args.rounds)
    for amp in (False, True):
        rows[f"certify ({'bf16' if amp else 'fp32'})"] = certify_rate(model, args.image_size, args.batch_size, patch_sizes,
                                                                     amp, args.rounds)
    rows["train step (bf16, channels_last)"] = train_step_rate(model, args.image_size, args.batch_size, patch_sizes,
                                                               args.rounds)
    ips = {k: v[0] for k, v in rows.items()}
    ratios = {
        "data_eval_over_certify_bf16": ips["data (evaluation view)"] / ips["certify (bf16)"],
        "data_train_over_train_step": ips["data (training view)"] / ips["train step (bf16, channels_last)"],
    }
    for k, v in ips.items():
        print(f"{k:36s} {v:9.1f} images/s")
    for k, v in ratios.items():
        print(f"{k:36s} {v:9.2f} ({'the model limits' if v > 1 else 'the data path limits'})")
    res = {"env": environment_info(), "model": args.model, "classes": args.classes, "image_size": args.image_size,
           "resize": resize, "patch_sizes": patch_sizes, "batch_size": args.batch_size, "images": args.images,
           "workers": args.workers, "threads": args.threads, "rounds": args.rounds, "data": str(args.data),
           "images_per_s": ips, "rounds_images_per_s": {k: v[1] for k, v in rows.items()}, "ratios": ratios}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
