#!/usr/bin/env python3
"""Certify a checkpoint against adversarial patches, in batch, and write a report.

With no arguments it certifies the shipped CIFAR-10 checkpoint on the sample test images bundled
in ``samples/cifar10`` and prints the report.

Examples:
    python certify.py
    python certify.py --dataset ../shared/data/cifar10 --patch-sizes 1,2,3,4,5,6,7,8,3x7 --output outputs/c10-full
    python certify.py --checkpoint my.pt --dataset /data/imagenet/val --num-images 5000
    torchrun --nproc-per-node 2 certify.py --dataset ...     # shards images over processes
    python certify.py --attacks pgd,pgd-adaptive,universal,feature-space --attack-images 100 --patch-sizes 5

Outputs in --output: results.json (canonical, schema in bagcert/report.py), per_sample.csv,
summary.md, certified_accuracy.png (with matplotlib). The last line printed is a one-line JSON summary.

With --attacks, a seeded subset of the certified images is also attacked for every patch size (see
docs/attacks.md); the report puts empirical robust accuracy per attack next to certified accuracy, and
the run exits with status 3 if any certified sample was broken (a soundness bug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bagcert.empirical import ATTACK_NAMES

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "bagcert_cifar10_r9s2.pt"
DEFAULT_DATASET = ROOT / "samples" / "cifar10"


def _percent(token: str) -> float:
    try:
        value = float(token[:-1])
    except ValueError:
        raise ValueError(f"patch size {token!r} is not understood: expected a percentage of the image area like '2%'") from None
    if not 0 < value <= 100:
        raise ValueError(f"patch area {token!r} must lie in (0, 100] %")
    return value


def _load_eval_data(args, meta, size, num_classes):
    """The images to certify. A folder without split sub-folders is cut with the seeded split the checkpoint
    was trained with (``meta['split']``): ``--split test`` keeps its test part, ``--split all`` every image."""
    from bagcert.data import load_dataset, seeded_split

    split_info = meta.get("split")
    root = Path(args.dataset)
    has_split_folder = (root / args.split).is_dir()
    if args.split == "all" and not has_split_folder:
        return load_dataset(args.dataset, "test", size=size, resize=meta.get("resize"), seed=args.seed, num_classes=num_classes)
    data = load_dataset(args.dataset, args.split, size=size, resize=meta.get("resize"), seed=args.seed, num_classes=num_classes)
    if split_info and data.info.get("layout") == "image-folder" and not has_split_folder:
        n = int(split_info["num_images"])
        if len(data) != n:
            raise SystemExit(
                f"{args.dataset} has {len(data)} images but the checkpoint's seeded split was made over {n}: "
                "not the same folder (give --split all to certify every image)"
            )
        if args.split not in ("test", "train"):
            raise SystemExit(f"--split must be test, train or all for a folder without split folders, got {args.split!r}")
        tr, te = seeded_split(n, float(split_info["test_fraction"]), int(split_info["seed"]))
        data = data.subset(te if args.split == "test" else tr)
        data.info["split"] = args.split
        data.info["seeded_split"] = {k: split_info[k] for k in ("seed", "test_fraction", "num_images") if k in split_info}
    return data


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="bagcert checkpoint (default: the shipped CIFAR-10 model)")
    p.add_argument(
        "--dataset",
        default=str(DEFAULT_DATASET),
        help="CIFAR-10 folder (torchvision cifar-10-batches-py or <root>/test/<class>/*), an ImageNet-style folder, or synthetic[:N]",
    )
    p.add_argument(
        "--split", default="test",
        help="split folder for datasets that have one (default: test). For a folder without splits, 'test' is the "
        "seeded test split recorded in the checkpoint (if any) and 'all' every image",
    )
    p.add_argument(
        "--patch-sizes", default="1,2,3,4,5,6,7,8,3x7,7x3",
        help="comma-separated sizes: 5 for 5x5, 3x7 for height 3 x width 7, 2%% for a square of 2%% of the image area",
    )
    p.add_argument("--aggregation", choices=["votes", "majority", "clipped"], help="default: the model's own")
    p.add_argument("--num-images", type=int, help="certify only the first N images of a seeded permutation")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset (with --num-images) and synthetic data")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", default="outputs/certify", help="report folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    a = p.add_argument_group("empirical attacks (default: none)")
    a.add_argument("--attacks", default="", help="comma-separated list from: " + ", ".join(ATTACK_NAMES))
    a.add_argument("--attack-steps", type=int, default=150, help="PGD steps per location; universal-patch optimisation steps")
    a.add_argument("--attack-step-size", type=float, default=0.05, help="signed-gradient step in [0, 1] pixel units")
    a.add_argument("--attack-locations", type=int, default=80, help="PGD patch positions per image; universal-patch poses per image")
    a.add_argument("--attack-images", type=int, help="attack only the first N images of a seeded permutation (default: all)")
    a.add_argument("--attack-patch-sizes", help="sizes to attack, a subset of --patch-sizes (default: all of them)")
    a.add_argument("--attack-surrogate", choices=["relaxed_votes", "logits"], default="relaxed_votes", help="differentiable stand-in for the votes")
    a.add_argument("--universal-fit-images", type=int, default=256, help="images outside the attacked subset the universal patch is trained on")
    a.add_argument("--imagenet-patch-file", help="imagenet_patch.gz (default: $BAGCERT_IMAGENET_PATCH or ../shared/data/imagenet-patch/)")
    return p


def main(argv=None) -> int:
    rc = _main(argv)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank leaves the process group together: a rank that exits early aborts gloo's peers
        dist.barrier()
        dist.destroy_process_group()
    return rc


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bagcert.checkpoint import load_checkpoint
    from bagcert.evaluation import certify_dataset, size_key
    from bagcert.geometry import parse_patch_size, patch_side_for_area
    from bagcert.report import write_certification_report

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")

    size_tokens = [s.strip() for s in args.patch_sizes.split(",") if s.strip()]
    if not size_tokens:
        raise SystemExit("--patch-sizes is empty; give e.g. 1,2,5 or 3x7 or 2%")
    try:
        # percentages are resolved once the model's input size is known; checked here so that bad input fails fast
        [_percent(t) if t.endswith("%") else parse_patch_size(t) for t in size_tokens]
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--patch-sizes: {e}") from None
    area_sizes = {}

    def resolve_sizes(tokens, image_size):
        out = []
        for t in tokens:
            if t.endswith("%"):
                side = patch_side_for_area(_percent(t), image_size)
                area_sizes[t] = f"{side}x{side}"
                out.append((side, side))
            else:
                out.append(parse_patch_size(t))
        return out

    sizes = resolve_sizes(size_tokens, 32)  # placeholder keys for the attack-size check below
    attacks = _parse_attacks(args.attacks)
    attack_keys = None
    if attacks:
        for flag, value in (("--attack-steps", args.attack_steps), ("--attack-locations", args.attack_locations)):
            if value < (0 if flag == "--attack-steps" else 1):
                raise SystemExit(f"{flag} must be {'>= 0' if flag == '--attack-steps' else '>= 1'}, got {value}")
        if args.attack_images is not None and args.attack_images < 1:
            raise SystemExit(f"--attack-images must be >= 1, got {args.attack_images}")
        if not args.attack_step_size > 0:
            raise SystemExit(f"--attack-step-size must be > 0, got {args.attack_step_size}")
        keys = [size_key(s) for s in sizes]
        if args.attack_patch_sizes:
            attack_tokens = [s.strip() for s in args.attack_patch_sizes.split(",") if s.strip()]
            try:
                attack_keys = [size_key(s) for s in resolve_sizes(attack_tokens, 32)]
            except (TypeError, ValueError) as e:
                raise SystemExit(f"--attack-patch-sizes: {e}") from None
            bad = [k for k in attack_keys if k not in keys]
            if bad:
                raise SystemExit(f"--attack-patch-sizes {bad} are not among --patch-sizes {keys}")

    model, meta = load_checkpoint(args.checkpoint)
    model.to(args.device).eval()
    size = int(meta.get("input_size", 32))
    sizes = resolve_sizes(size_tokens, size)
    if attack_keys is not None:
        attack_keys = [size_key(s) for s in resolve_sizes(attack_tokens, size)]
    data = _load_eval_data(args, meta, size, model.num_classes)
    if len(data.classes) != model.num_classes:
        raise SystemExit(f"dataset has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes) and data.name != "synthetic":
        raise SystemExit(f"dataset classes {data.classes} differ from the checkpoint's classes {meta['classes']}")
    if args.num_images is not None:
        if args.num_images < 1:
            raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
        if args.num_images < len(data):
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
            data = data.subset(perm[: args.num_images].sort().values)

    results, timing = certify_dataset(
        model, data, sizes, batch_size=args.batch_size, device=args.device, aggregation=args.aggregation,
        progress=args.progress and not args.quiet and rank == 0, rank=rank, world=world,
    )
    if world > 1:
        t = torch.tensor([timing["forward_s"], timing["certify_s"], timing["total_s"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        timing.update(forward_s=float(t[0]), certify_s=float(t[1]), total_s=float(t[2]))
    if rank != 0:
        return 0
    config = {k: v for k, v in vars(args).items()}
    config["patch_sizes"] = [size_key(s) for s in sizes]
    if area_sizes:
        config["patch_area_sizes"] = {k: v for k, v in area_sizes.items()}
    config["world_size"] = world
    dataset = {"name": data.name, "root": data.info.get("root"), "split": data.info.get("split", args.split)}
    if "seeded_split" in data.info:
        dataset["seeded_split"] = data.info["seeded_split"]
    ckpt = {"path": str(args.checkpoint), "model": model.config["name"], "model_kwargs": model.config["kwargs"], "metadata_summary": {k: meta[k] for k in ("dataset", "epochs", "wall_seconds", "eval") if k in meta}}
    empirical = None
    if attacks:
        from bagcert.empirical import run_empirical_evaluation

        empirical = run_empirical_evaluation(
            model, data, results, attacks, patch_sizes=attack_keys, num_images=args.attack_images, steps=args.attack_steps,
            step_size=args.attack_step_size, locations=args.attack_locations, surrogate=args.attack_surrogate, seed=args.seed,
            universal_fit_images=args.universal_fit_images, metadata=meta, imagenet_patch_path=args.imagenet_patch_file,
            device=args.device, output=args.output, log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True),
        )
    summary = write_certification_report(args.output, results, timing, config, dataset, ckpt, device=args.device, empirical=empirical)
    if not args.quiet:
        print((Path(args.output) / "summary.md").read_text())
        print(f"report written to {args.output}/ (results.json, per_sample.csv, summary.md)")
    line = {
        "clean_accuracy": round(summary["clean_accuracy"], 6),
        "certified_accuracy": {k: round(v, 6) for k, v in summary["certified_accuracy"].items()},
        "num_images": summary["num_images"],
        "images_per_s": round(summary["images_per_s"], 2),
        "output": str(args.output),
    }
    if empirical:
        per = empirical["summary"]["per_size"]
        line["empirical_robust_accuracy"] = {k: {a: round(v, 6) for a, v in r["robust_accuracy"].items()} for k, r in per.items()}
        line["certified_broken"] = summary["certified_broken"]
    print(json.dumps(line))
    broken = {k: v for k, v in summary["certified_broken"].items() if v}
    if broken:
        from bagcert.empirical import soundness_message

        for k in broken:
            print(soundness_message(empirical["results"][k]), file=sys.stderr)
        print(f"FAILED: certified samples were broken by attacks ({broken}); see {args.output}/results.json", file=sys.stderr)
        return 3
    return 0


def _parse_attacks(text: str) -> list:
    import difflib

    names = [a.strip() for a in (text or "").split(",") if a.strip()]
    for a in names:
        if a not in ATTACK_NAMES:
            close = difflib.get_close_matches(a, ATTACK_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SystemExit(f"--attacks: unknown attack {a!r}{hint}; choose from {', '.join(ATTACK_NAMES)}")
    return list(dict.fromkeys(names))


if __name__ == "__main__":
    sys.exit(main())
