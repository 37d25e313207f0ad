#!/usr/bin/env python3
"""Training throughput: certified loss against plain cross-entropy, fp32 against bf16 autocast.

For each setting, a full training step (forward, loss, backward, AdamW step) on a fixed batch is timed;
settings are interleaved round-robin and the median over rounds is reported, so the ratios come from
one run on one machine. Targets: certified loss at most 15 % slower than cross-entropy.

    python benchmarks/train_throughput.py --model cifar_bagnet9_s2 --width 128 --rounds 5 --output docs/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bagcert  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.report import environment_info  # noqa: E402


def make_step(model, loss_name, amp, x, y):
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = BagCertLoss(model.geometry, tuple(x.shape[-2:]), [5], margin_weight=5.0, tau=2.0, ce_weight=1.0)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            z = model.local_logits(x)
        if loss_name == "ce":
            loss = F.cross_entropy(z.float().mean(dim=(2, 3)), y)
        else:
            loss, _ = loss_fn(z, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_bagnet9_s2")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, usually all cores)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.rand(args.batch_size, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    settings = {}
    for loss_name in ("ce", "bagcert"):
        for amp in (False, True):
            model = bagcert.create_model(args.model, width=args.width).to(dev, memory_format=torch.channels_last)
            model.check_inputs = False
            step = make_step(model, loss_name, amp, x, y)
            step()  # warm-up
            settings[f"{loss_name}_{'bf16' if amp else 'fp32'}"] = (step, [])
    for _ in range(args.rounds):
        for name, (step, times) in settings.items():
            sync()
            t = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            sync()
            times.append((time.perf_counter() - t) / args.steps_per_round)
    ips = {name: args.batch_size / statistics.median(times) for name, (_, times) in settings.items()}
    res = {
        "env": environment_info(dev),
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "images_per_s": ips,
        "certified_loss_cost_bf16": ips["ce_bf16"] / ips["bagcert_bf16"],
        "certified_loss_cost_fp32": ips["ce_fp32"] / ips["bagcert_fp32"],
        "bf16_speedup_certified": ips["bagcert_bf16"] / ips["bagcert_fp32"],
    }
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
