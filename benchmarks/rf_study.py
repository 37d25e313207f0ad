#!/usr/bin/env python3
"""Receptive-field / stride / width study: certified accuracy per CPU-minute.

Each configuration trains with the same certified loss and optimiser for the same wall-clock budget
(its epoch count is set from a throughput probe so that it fits the budget), then is certified on
held-out CIFAR-10 test images. Writes a Markdown table and JSON to --output.

    python benchmarks/rf_study.py --dataset ../shared/data/cifar10 --minutes 5 --output docs/results/rf_study
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bagcert.data import load_cifar10  # noqa: E402
from bagcert.evaluation import certify_dataset  # noqa: E402
from bagcert.losses import BagCertLoss  # noqa: E402
from bagcert.models import create_model  # noqa: E402
from bagcert.report import environment_info  # noqa: E402
from bagcert.training import TrainConfig, train  # noqa: E402

#: name -> (model kwargs, loss overrides). Loss defaults are TrainConfig's (min-margin hinge, BCE, CE).
CONFIGS = {
    "r5_s2_w128": (dict(receptive_field=5, stride=2, width=128), {}),
    "r7_s2_w128": (dict(receptive_field=7, stride=2, width=128), {}),
    "r9_s2_w128": (dict(receptive_field=9, stride=2, width=128), {}),
    "r13_s2_w128": (dict(receptive_field=13, stride=2, width=128), {}),
    "r9_s2_w128_valid": (dict(receptive_field=9, stride=2, width=128, padding="valid"), {}),
    "r9_s1_w64": (dict(receptive_field=9, stride=1, width=64), {}),
    "r9_s2_w128_mean": (dict(receptive_field=9, stride=2, width=128), {"margin_reduce": "mean"}),
    "r9_s2_w128_pw3": (dict(receptive_field=9, stride=2, width=128), {"bce_pos_weight": 3.0}),
    # stride 1: 32 x 32 locations; bf16 autocast is the faster precision for it on the 2-core Xeon
    "r9_s1_w96_bf16": (dict(receptive_field=9, stride=1, width=96), {"amp": True}),
}


def probe_throughput(kwargs, loss_kw, amp, batch=128, steps=6):
    loss_kw = {k: v for k, v in loss_kw.items() if k != "amp"}
    m = create_model("cifar_bagnet", num_classes=10, **kwargs).to(memory_format=torch.channels_last)
    m.check_inputs = False
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    loss_fn = BagCertLoss(m.geometry, (32, 32), [5], **loss_kw)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = m.local_logits(x)
        loss, _ = loss_fn(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / sorted(times[2:])[len(times[2:]) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per configuration")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch threads per configuration (default: all)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (slower than fp32 for these models on the 2-core Xeon)")
    p.add_argument("--output", default="docs/results/rf_study")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train_data = load_cifar10(args.dataset, "train")
    test = load_cifar10(args.dataset, "test")
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.eval_images].sort().values)
    rows = []
    results_path = out / "results.json"
    done = {r["name"]: r for r in json.loads(results_path.read_text())["rows"]} if results_path.exists() else {}
    for name in args.configs.split(","):
        if name in done:
            rows.append(done[name])
            continue
        kw, loss_kw = CONFIGS[name]
        amp = loss_kw.get("amp", args.amp)  # a configuration may fix its precision
        loss_kw = {k: v for k, v in loss_kw.items() if k != "amp"}
        from bagcert.checkpoint import load_checkpoint

        if (out / name / "model.pt").is_file():  # trained by an interrupted earlier call: reuse it
            model, meta = load_checkpoint(out / name / "model.pt")
            cfg_done = json.loads((out / name / "config.json").read_text())
            epochs, wall = meta["epochs"], meta["wall_seconds"]
            ips = cfg_done["epochs"] * len(train_data) / (args.minutes * 60)
        else:
            model = None
            ips = probe_throughput(kw, loss_kw, amp)
            epochs = args.minutes * 60 * ips / len(train_data)
        cfg = None if model is not None else TrainConfig(
            dataset=args.dataset, model="cifar_bagnet", model_kwargs=kw, epochs=epochs, amp=amp, ema=0.0, **loss_kw,
            warmup_epochs=min(1.0, epochs / 5), margin_warmup_epochs=min(2.0, epochs / 3), eval_every=1e9,
            output=str(out / name), tensorboard=False, progress=False, checkpoint_minutes=1e9,
        )
        if model is None:
            t = time.perf_counter()
            train(cfg, train_data, None, log=lambda *a: None)
            wall = time.perf_counter() - t
            model, _ = load_checkpoint(out / name / "model.pt")
        res, timing = certify_dataset(model, test, [2, 5, 8])
        gh, gw = model.grid_size(32, 32)
        row = {
            "name": name, **kw, "loss": loss_kw, "amp": amp, "locations": gh * gw, "train_images_per_s": ips, "epochs": epochs, "train_wall_s": wall,
            "clean": res["5"].clean_accuracy, "certified_2": res["2"].certified_accuracy,
            "certified_5": res["5"].certified_accuracy, "certified_8": res["8"].certified_accuracy,
            "certify_images_per_s": len(test) / timing["total_s"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        results_path.write_text(json.dumps({"env": environment_info(), "minutes": args.minutes, "amp": args.amp, "eval_images": len(test), "rows": rows}, indent=2))
    amp_default = args.amp
    lines = [
        f"Budget {args.minutes} min of training per configuration with {torch.get_num_threads()} thread(s), "
        f"{'bf16 autocast' if args.amp else 'fp32'} (unless the row says otherwise) + channels_last, batch 128, AdamW 2e-3,",
        f"certified loss (patch 5). Evaluated on {len(test)} CIFAR-10 (JPEG q75 copy) test images.",
        "",
        "| config | rf | stride | padding | width | loss change | precision | locations | train img/s | epochs | clean % | cert 2x2 % | cert 5x5 % | cert 8x8 % |",
        "| --- | ---: | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['receptive_field']} | {r['stride']} | {r.get('padding', 'same')} | {r['width']} | "
            f"{', '.join(f'{k}={v}' for k, v in r.get('loss', {}).items()) or '-'} | {'bf16' if r.get('amp', amp_default) else 'fp32'} | {r['locations']} | "
            f"{r['train_images_per_s']:.0f} | {r['epochs']:.2f} | {100 * r['clean']:.1f} | {100 * r['certified_2']:.1f} | "
            f"{100 * r['certified_5']:.1f} | {100 * r['certified_8']:.1f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
