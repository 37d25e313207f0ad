#!/usr/bin/env python3
"""Certify the same images with BagCert and every peer certifier (bagcert.peers) in one run.

For each method: clean accuracy, certified accuracy, images/s of the whole certification (forward
passes + certificate) and its cost relative to the one-pass BagCert certificate (wall time, and CPU
time of this process, which other jobs on a shared machine disturb less), plus the number of network
evaluations per image. Weights: ``--checkpoint`` (a bagcert checkpoint) serves BagCert,
Clipped BagNet, PatchGuard and, unless ``--pc-checkpoint`` is given, PatchCleanser's base classifier;
``--drs-checkpoint`` (a peer classifier, ``bagcert.peers.save_peer_classifier``) serves de-randomized
smoothing. Any method without weights gets a RANDOMLY INITIALISED model of the same backbone family,
and the output says so: its accuracies are then meaningless, only its speed is informative.

    python benchmarks/peers_compare.py                       # samples/cifar10, 10 images, random weights
    python benchmarks/peers_compare.py --checkpoint ckpt.pt --num-images 200 --output out/peers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bagcert  # noqa: E402
from bagcert import peers  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.report import environment_info  # noqa: E402

METHODS = ("bagcert", "clipped_bagnet", "patchguard", "drs", "patchcleanser")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="samples/cifar10", help="dataset spec for bagcert.data.load_dataset")
    d.add_argument("--split", default="test")
    d.add_argument("--num-images", type=int, default=10, help="evenly spaced images of the split (0 = all)")
    d.add_argument("--patch-size", default="5", help="int or HEIGHTxWIDTH, pixels")
    m = p.add_argument_group("models")
    m.add_argument("--checkpoint", help="bagcert checkpoint (BagCert, Clipped BagNet, PatchGuard, PatchCleanser base)")
    m.add_argument("--drs-checkpoint", help="peer-classifier checkpoint of the DRS base classifier")
    m.add_argument("--pc-checkpoint", help="bagcert checkpoint of the PatchCleanser base classifier")
    m.add_argument("--model", default="cifar_bagnet9_s2", help="backbone for random initialisation")
    m.add_argument("--width", type=int, default=32, help="width of randomly initialised backbones")
    m.add_argument("--seed", type=int, default=0, help="seed of random initialisation")
    c = p.add_argument_group("certifiers")
    c.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    c.add_argument("--band-size", type=int, default=4, help="DRS band width b")
    c.add_argument("--drs-mode", choices=("column", "block"), default="column")
    c.add_argument("--drs-encoding", choices=("mask", "levine_feizi", "fill"), default="mask")
    c.add_argument("--k", type=int, default=6, help="PatchCleanser masks per axis")
    c.add_argument("--fill", type=float, default=0.5, help="PatchCleanser masked-pixel value")
    c.add_argument("--batch-size", type=int, default=512, help="images per network call")
    o = p.add_argument_group("run")
    o.add_argument("--threads", type=int, help="torch threads (default: torch's own setting)")
    o.add_argument("--output", help="write the JSON result here")
    return p


def _dataset_spec(spec: str) -> str:
    if ":" not in spec and not Path(spec).exists() and (ROOT / spec).exists():
        return str(ROOT / spec)
    return spec


def _random_model(name, num_classes, width, seed):
    torch.manual_seed(seed)
    return bagcert.create_model(name, num_classes=num_classes, width=width).eval()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = bagcert.parse_patch_size(args.patch_size)
    ds = load_dataset(_dataset_spec(args.dataset), args.split)
    n = len(ds) if args.num_images <= 0 else min(args.num_images, len(ds))
    index = torch.linspace(0, len(ds) - 1, n).round().long() if n < len(ds) else torch.arange(len(ds))
    x, y = ds.float_images(index), ds.labels[index]
    num_classes = len(ds.classes)
    image_size = tuple(x.shape[-2:])

    if args.checkpoint:
        model, _ = bagcert.load_checkpoint(args.checkpoint)
        model_src = f"checkpoint {args.checkpoint}"
        backbone, kwargs = model.config["name"], {k: v for k, v in model.config["kwargs"].items() if k != "num_classes"}
    else:
        model = _random_model(args.model, num_classes, args.width, args.seed)
        model_src = f"RANDOM INIT {args.model} width {args.width} seed {args.seed}"
        backbone, kwargs = args.model, {"width": args.width}
    if args.pc_checkpoint:
        pc_model, _ = bagcert.load_checkpoint(args.pc_checkpoint)
        pc_src = f"checkpoint {args.pc_checkpoint}"
    else:
        pc_model, pc_src = model, model_src
    if args.drs_checkpoint:
        drs_model, _ = peers.load_peer_classifier(args.drs_checkpoint)
        drs_src = f"peer classifier {args.drs_checkpoint}"
    elif args.drs_encoding == "fill":
        drs_model, drs_src = model, model_src
    else:
        torch.manual_seed(args.seed)
        drs_model = peers.ablation_classifier(backbone, num_classes, encoding=args.drs_encoding, **kwargs).eval()
        drs_src = f"RANDOM INIT {backbone} {kwargs} with a {args.drs_encoding!r}-encoding input ({drs_model.in_channels} channels)"

    certifiers = {
        "bagcert": (peers.BagCert(batch_size=args.batch_size), model, model_src),
        "clipped_bagnet": (peers.ClippedBagNet(batch_size=args.batch_size), model, model_src),
        "patchguard": (peers.PatchGuardMasking(batch_size=args.batch_size), model, model_src),
        "drs": (
            peers.DerandomizedSmoothing(args.band_size, args.drs_mode, args.drs_encoding, batch_size=args.batch_size),
            drs_model,
            drs_src,
        ),
        "patchcleanser": (peers.PatchCleanser(args.k, args.fill, batch_size=args.batch_size), pc_model, pc_src),
    }
    methods = ["bagcert"] + [m for m in args.methods if m != "bagcert"]  # BagCert is the cost reference
    results = {}
    with torch.inference_mode():
        for key in methods:
            cert, net, src = certifiers[key]
            cert.certify(net, x[:1], y[:1], patch)  # warm-up (allocations, lazy init)
            t, c = time.perf_counter(), time.process_time()
            res = cert.certify(net, x, y, patch)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            results[key] = {
                "name": cert.name,
                "weights": src,
                "random_init": src.startswith("RANDOM"),
                "clean_accuracy": res.clean_accuracy,
                "certified_accuracy": res.certified_accuracy,
                "certified_count": int(res.certified_correct.sum()),
                "correct_count": int(res.correct.sum()),
                "forward_passes_per_image": cert.forward_passes_per_image(image_size, patch),
                "seconds": dt,
                "cpu_seconds": dc,
                "images_per_s": n / dt,
                "cpu_images_per_s": n / dc if dc > 0 else float("nan"),
            }
    ref, ref_cpu = results["bagcert"]["seconds"], results["bagcert"]["cpu_seconds"]
    for r in results.values():
        r["cost_ratio_to_bagcert"] = r["seconds"] / ref
        # CPU time of this process: less sensitive than wall time to other jobs sharing the machine
        r["cpu_cost_ratio_to_bagcert"] = r["cpu_seconds"] / ref_cpu if ref_cpu > 0 else float("nan")
    out = {
        "tool": "benchmarks/peers_compare.py",
        "env": environment_info(),
        "config": vars(args),
        "dataset": {"spec": args.dataset, "name": ds.name, "split": args.split, "num_images": n, "indices": "evenly spaced"},
        "image_size": list(image_size),
        "patch_size": list(patch),
        "methods": {k: results[k] for k in methods if k in args.methods},
    }
    print(f"{n} images of {ds.name} ({args.split}), {image_size[0]}x{image_size[1]} px, patch {patch[0]}x{patch[1]}")
    print(f"{out['env']['hardware']}; torch {out['env']['torch_version']}")
    print(f"{'method':<18} {'clean':>6} {'cert':>6} {'passes':>7} {'img/s':>9} {'cost x':>8} {'cpu img/s':>10} {'cpu x':>8}  weights")
    for k, r in out["methods"].items():
        print(
            f"{r['name']:<18} {r['clean_accuracy']:6.3f} {r['certified_accuracy']:6.3f} {r['forward_passes_per_image']:7d} "
            f"{r['images_per_s']:9.1f} {r['cost_ratio_to_bagcert']:8.1f} "
            f"{r['cpu_images_per_s']:10.1f} {r['cpu_cost_ratio_to_bagcert']:8.1f}  {r['weights']}"
        )
    if any(r["random_init"] for r in out["methods"].values()):
        print("NOTE: randomly initialised weights: accuracies are meaningless; only speed and cost are informative.")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
