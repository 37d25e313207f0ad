#!/usr/bin/env python3
"""Does the data path scale? train.py and certify.py on synthetic ImageNet-like folders of growing size.

For each N in ``--sizes`` this writes (once, into ``--work``) N JPEG images of ImageNet-like sizes (300-500 px
sides, ``--classes`` classes; ``benchmarks/data_path.write_imagenet_like_folder``), then measures, each in its own
process:

* ``train.py --data-path stream`` for ``--train-steps`` steps: the peak resident memory (the largest of the
  process and its loader workers, ``ru_maxrss`` from ``os.wait4``), the time from the process start to its first
  logged training step (read off ``train_log.jsonl`` as it appears: listing the files, building the model and the
  loader, the first batch), and the wall time;
* ``certify.py --data-path stream`` on the run's held-out split: the peak resident memory and images/s;
* the data path alone (one epoch of the streaming loader in evaluation view, no model) against the model alone
  (forward passes on random images of the same size), in images/s, so that a reader sees which one limits.

What it checks: the peak memory of N = 20,000 stays within 1.2x that of N = 2,000, and the time to the first step
does not grow with N. Both ratios are in the JSON (``memory_ratio``, ``first_step_ratio``).

    python benchmarks/imagenet_scale.py --sizes 2000,20000 --workers 2 --threads 2 --output docs/results/imagenet_scale.json
    python benchmarks/imagenet_scale.py --sizes 100,300 --train-steps 3 --work /tmp/scale_smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.report import environment_info  # noqa: E402


def run_measured(cmd: list[str], log_file: Path | None = None, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd``; return its exit status, wall seconds, peak RSS in MiB (``ru_maxrss`` of the process and the
    children it waited for) and, with ``log_file``, the seconds until the first record with a ``loss`` appeared."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first = None
    out = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        chunk = proc.stdout.read()
        if chunk:
            out += chunk
        if first is None and log_file is not None and log_file.exists():
            if any('"loss"' in line for line in log_file.read_text().splitlines()):
                first = time.perf_counter() - t0
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise SystemExit(f"{cmd[1]} ran longer than {timeout} s")
        time.sleep(0.05)
    rest = proc.stdout.read()
    out += rest or b""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {rc}:\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024, "first_step_s": first,
            "output_tail": out.decode(errors="replace")[-400:]}


def data_alone(folder: Path, size: int, resize: int, batch: int, workers: int, limit: int) -> float:
    """Images/s of one pass of the streaming loader (evaluation view) over at most ``limit`` images, no model."""
    from bagcert.streaming import ImageFolderStream, SubsetStream, make_loader

    ds = ImageFolderStream(folder, size=size, resize=resize)
    if limit < len(ds):
        ds = SubsetStream(ds, torch.arange(limit))
    loader = make_loader(ds, batch_size=batch, train=False, seed=0, epoch=0, workers=workers)
    t = time.perf_counter()
    seen = sum(b[0].shape[0] for b in loader)
    return seen / (time.perf_counter() - t)


def model_alone(model_name: str, classes: int, size: int, batch: int, rounds: int = 3) -> float:
    """Images/s of the model's forward pass (local logits) on random images, no data path."""
    import bagcert

    model = bagcert.create_model(model_name, num_classes=classes).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model.local_logits(x)
        t = time.perf_counter()
        for _ in range(rounds):
            model.local_logits(x)
    return rounds * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,20000", help="comma-separated image counts")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--model", default="image_bagnet17_s8")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--resize", type=int, default=146)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-images", type=int, default=1000, help="images timed for the data path alone")
    p.add_argument("--work", default="/tmp/bagcert_scale", help="where the folders and runs go (reused)")
    p.add_argument("--output", help="write the JSON here")
    args = p.parse_args(argv)
    from data_path import write_imagenet_like_folder

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes: expected comma-separated integers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 2 * args.classes:
        raise SystemExit(f"--sizes: every size must be >= 2 x --classes = {2 * args.classes}, got {args.sizes!r}")
    work = Path(args.work)
    torch.set_num_threads(args.threads)
    env = dict(os.environ, PYTHONUNBUFFERED="1", BAGCERT_NO_CACHE="1")
    rows = []
    for n in sizes:
        folder = work / f"folder_{n}_{args.classes}"
        if not (folder / ".complete").exists():
            write_imagenet_like_folder(folder, n, classes=args.classes, seed=0)
            (folder / ".complete").write_text("ok\n")
        run = work / f"train_{n}"
        common = ["--threads", str(args.threads), "--workers", str(args.workers), "--data-path", "stream"]
        train = run_measured(
            [sys.executable, "train.py", "--dataset", str(folder), "--model", args.model, "--num-classes", str(args.classes),
             "--image-size", str(args.image_size), "--resize", str(args.resize), "--batch-size", str(args.batch_size),
             "--max-steps", str(args.train_steps), "--epochs", "1", "--log-every", "1", "--eval-every", "1000000",
             "--eval-images", "64", "--no-tensorboard", "--no-progress", "--output", str(run), *common],
            log_file=run / "train_log.jsonl", env=env)
        rep = work / f"certify_{n}"
        cert = run_measured(
            [sys.executable, "certify.py", "--checkpoint", str(run / "model.pt"), "--dataset", str(folder), "--split", "test",
             "--patch-sizes", "2%", "--batch-size", str(args.batch_size), "--no-progress", "--quiet", "--overwrite",
             "--output", str(rep), *common], env=env)
        res = json.loads((rep / "results.json").read_text())
        rows.append({
            "images": n, "train": {k: v for k, v in train.items() if k != "output_tail"},
            "certify": {"peak_rss_mib": cert["peak_rss_mib"], "wall_s": cert["wall_s"], "images": res.get("num_images"),
                        "images_per_s": res.get("num_images", 0) / cert["wall_s"]},
        })
        print(json.dumps(rows[-1]), flush=True)
    folder = work / f"folder_{sizes[0]}_{args.classes}"
    split = {
        "data_alone_images_per_s": data_alone(folder, args.image_size, args.resize, args.batch_size, args.workers, args.data_images),
        "model_alone_images_per_s": model_alone(args.model, args.classes, args.image_size, args.batch_size),
    }
    small, large = rows[0], rows[-1]
    out = {
        "env": environment_info(), "threads": args.threads, "workers": args.workers, "model": args.model,
        "image_size": args.image_size, "resize": args.resize, "classes": args.classes, "rows": rows, "throughput": split,
        "memory_ratio": {"train": large["train"]["peak_rss_mib"] / small["train"]["peak_rss_mib"],
                         "certify": large["certify"]["peak_rss_mib"] / small["certify"]["peak_rss_mib"]},
        "first_step_ratio": large["train"]["first_step_s"] / small["train"]["first_step_s"],
    }
    print(json.dumps(out, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
