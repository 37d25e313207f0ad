#!/usr/bin/env python3
"""Data-path throughput: the streaming path (bagcert.streaming) against the in-memory path (bagcert.data).

Two parts, each timing the data path alone (no model):

1. CIFAR-10 JPEG folders (a class-balanced subset of the training split, ``--cifar-images``): the
   in-memory path's one-time decode of the subset, then its epoch of batches (index the uint8 tensor,
   ``augment_batch`` pad-4 crop + flip, as the training loop does), against one epoch of the streaming
   loader (decode per item, pad-4 crop + flip per item) with ``--workers`` worker processes.
2. A synthetic ImageNet-like JPEG folder (``--imagenet-images`` images of 300-500 px sides in
   ``--imagenet-classes`` classes, written with PIL from ``--seed``, quality 90): one epoch of the
   streaming loader in evaluation view (decode, shorter side to 256, centre crop 224) and in training
   view (decode, RandomResizedCrop 224, flip), and the in-memory path's decode rate of the same files.

Images/s count every image of the epoch, worker start-up included (the first-batch latency is reported
separately). Numbers depend on the machine's cores, disk and page cache: measure on the machine that
will train.

    python benchmarks/data_path.py --threads 1 --workers 2 --cifar-images 5000 --imagenet-images 2000 --output results/data_path.json
    python benchmarks/data_path.py --cifar-images 200 --imagenet-images 200 --workers 0   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.data import DatasetError, augment_batch  # noqa: E402
from bagcert.report import environment_info  # noqa: E402
from bagcert.streaming import ImageFolderStream, make_loader  # noqa: E402

DEFAULT_CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10"


def write_imagenet_like_folder(root, n: int, classes: int = 10, seed: int = 0, min_side: int = 300, max_side: int = 500,
                               quality: int = 90) -> Path:
    """Write ``n`` JPEG images into ``<root>/<class>/<image>.JPEG`` (``classes`` folders ``n0000000``...,
    round-robin), each ``w`` x ``h`` with both sides drawn uniformly from ``[min_side, max_side]``: smooth
    random colour fields with some texture, so the JPEG sizes resemble photographs' (tens of KB).
    Deterministic in ``seed``. Returns ``root``. Raises ValueError for ``n < 1``, ``classes < 1`` or
    ``min_side > max_side``."""
    from PIL import Image

    if n < 1 or classes < 1 or not 1 <= min_side <= max_side:
        raise ValueError(f"need n >= 1, classes >= 1 and 1 <= min_side <= max_side, got {n}, {classes}, {min_side}, {max_side}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"n{c:07d}").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        im = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        im = np.clip(im + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(root / f"n{k % classes:07d}" / f"img_{k:06d}.JPEG", quality=quality)
    return root


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``ceil(n / C)`` items of each of the C classes, cut to ``n`` (int64 indices, sorted)."""
    classes = int(labels.max()) + 1
    per = -(-n // classes)
    idx = torch.cat([(labels == c).nonzero().flatten()[:per] for c in range(classes)])
    return idx.sort().values[:n]


def time_loader(loader) -> dict:
    """One pass over ``loader``: images, seconds, images/s and the seconds to the first batch."""
    t0 = time.perf_counter()
    first, n = None, 0
    for x, _, _ in loader:
        if first is None:
            first = time.perf_counter() - t0
        n += len(x)
    s = time.perf_counter() - t0
    return {"images": n, "seconds": s, "images_per_s": n / s, "first_batch_seconds": first}


def bench_cifar(args) -> dict:
    stream = ImageFolderStream(args.cifar_root, "train", size=None)  # stored 32x32, pad-4 crop + flip
    sub = stream.subset(balanced_subset(stream.labels, min(args.cifar_images, len(stream))))
    # in-memory path: decode once (the same decoder as bagcert.data), then index + augment_batch per batch
    t0 = time.perf_counter()
    images = torch.stack([sub[i][0] for i in range(len(sub))])
    decode_s = time.perf_counter() - t0
    n, B = len(sub), args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=g)
    for k in range(n // B + (n % B > 0)):
        idx = perm[k * B : (k + 1) * B]
        augment_batch(images[idx], g, flip=True, pad=4)
    epoch_s = time.perf_counter() - t0
    memory = {"decode_seconds": decode_s, "decode_images_per_s": n / decode_s, "epoch_seconds": epoch_s,
              "epoch_images_per_s": n / epoch_s, "bytes": images.numel()}
    streaming = time_loader(make_loader(sub, B, train=True, seed=args.seed, workers=args.workers, pin_memory=False))
    return {"images": n, "batch_size": B, "memory": memory, "stream_train": streaming}


def bench_imagenet(args, folder: Path) -> dict:
    ev = ImageFolderStream(folder, size=224, resize=256, augment="none")
    tr = ImageFolderStream(folder, size=224, resize=256, augment="resized-crop")
    B = args.batch_size
    res = {"images": len(ev), "batch_size": B}
    res["stream_eval"] = time_loader(make_loader(ev, B, train=False, workers=args.workers, pin_memory=False))
    res["stream_train"] = time_loader(make_loader(tr, B, train=True, seed=args.seed, workers=args.workers, pin_memory=False))
    t0 = time.perf_counter()
    for i in range(len(ev)):
        ev[i]
    s = time.perf_counter() - t0
    res["memory_decode"] = {"seconds": s, "images_per_s": len(ev) / s, "bytes_per_image": 3 * 224 * 224}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-root", default=str(DEFAULT_CIFAR), help="CIFAR-10 as <root>/train/<class>/*.jpg")
    p.add_argument("--cifar-images", type=int, default=5000, help="class-balanced subset of the training split (0 skips CIFAR)")
    p.add_argument("--imagenet-images", type=int, default=2000, help="synthetic ImageNet-like JPEGs to write (0 skips this part)")
    p.add_argument("--imagenet-classes", type=int, default=10)
    p.add_argument("--imagenet-dir", help="where to write (and keep) the synthetic folder; default: a temporary folder, removed after")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the streaming path (0: in this process)")
    p.add_argument("--threads", type=int, help="torch CPU threads of the main process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("cifar_images", "imagenet_images", "imagenet_classes", "batch_size", "workers"):
        v = getattr(args, name)
        if v < (1 if name in ("imagenet_classes", "batch_size") else 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {1 if name in ('imagenet_classes', 'batch_size') else 0}, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"env": environment_info("cpu"), "threads": torch.get_num_threads(), "workers": args.workers}
    try:
        if args.cifar_images:
            res["cifar10"] = bench_cifar(args)
        if args.imagenet_images:
            tmp = None
            if args.imagenet_dir:
                folder = Path(args.imagenet_dir)
                if folder.exists() and any(folder.iterdir()):
                    raise SystemExit(f"--imagenet-dir {folder} is not empty; give a new or empty folder")
            else:
                tmp = tempfile.mkdtemp(prefix="bagcert-imagenet-like-")
                folder = Path(tmp)
            try:
                t0 = time.perf_counter()
                write_imagenet_like_folder(folder, args.imagenet_images, args.imagenet_classes, args.seed)
                res["imagenet_like"] = {"write_seconds": time.perf_counter() - t0, **bench_imagenet(args, folder)}
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
    except DatasetError as e:
        raise SystemExit(f"data_path: {e}") from None
    print(json.dumps(res, indent=2))
    if args.output:
        atomic_write_text(args.output, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
