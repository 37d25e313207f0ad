#!/usr/bin/env python3
"""Certify the same images with BagCert and every peer certifier (bagcert.peers) in one run.

For each method: clean accuracy, certified accuracy, images/s of the whole certification (forward
passes + certificate) and its cost relative to the one-pass BagCert certificate (wall time, and CPU
time of this process, which other jobs on a shared machine disturb less), plus the number of network
evaluations per image. Weights: ``--checkpoint`` (a bagcert checkpoint) serves BagCert,
Clipped BagNet, PatchGuard and, unless ``--pc-checkpoint`` is given, PatchCleanser's base classifier.
``--drs-checkpoint`` and ``--pc-checkpoint`` take the ``peer_classifier.pt`` of ``train.py --peer``
(loaded with ``bagcert.peers.load_peer_certifier``): the certifier is then the one of the spec recorded
in the file (DRS: band size, mode, encoding; PatchCleanser: k, fill and the patch size of its mask set),
and a flag that contradicts it (``--band-size``, ``--drs-mode``, ``--drs-encoding``, ``--k``, ``--fill``)
is an error rather than a silently different configuration. A PatchCleanser classifier is certified
with its own mask set, for a ``--patch-size`` up to the one it was built for. ``--pc-checkpoint`` also
takes a bagcert model checkpoint, and both take a peer classifier saved by hand without a spec; the
flags (defaults: band 4, column, mask encoding, k 6, fill 0.5) then configure the certifier. Any method
without weights gets a RANDOMLY INITIALISED model of the same backbone family, and the output says so:
its accuracies are then meaningless, only its speed is informative.

    python benchmarks/peers_compare.py                       # samples/cifar10, 10 images, random weights
    python benchmarks/peers_compare.py --checkpoint ckpt.pt --num-images 200 --output out/peers.json
    python benchmarks/peers_compare.py --checkpoint ckpt.pt --drs-checkpoint runs/drs-column-b4/peer_classifier.pt \
        --pc-checkpoint runs/patchcleanser-p5/peer_classifier.pt --num-images 200
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
from bagcert.checkpoint import FORMAT as CHECKPOINT_FORMAT  # noqa: E402
from bagcert.checkpoint import safe_torch_load  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.peers.classifiers import FORMAT as PEER_FORMAT  # noqa: E402
from bagcert.report import environment_info  # noqa: E402

METHODS = ("bagcert", "clipped_bagnet", "patchguard", "drs", "patchcleanser")
DRS_DEFAULTS = {"band_size": 4, "mode": "column", "encoding": "mask"}
PC_DEFAULTS = {"k": 6, "fill": 0.5}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="samples/cifar10", help="dataset spec for bagcert.data.load_dataset")
    d.add_argument("--split", default="test")
    d.add_argument("--num-images", type=int, default=10, help="evenly spaced images of the split (0 = all)")
    d.add_argument("--patch-size", default="5", help="int or HEIGHTxWIDTH, pixels")
    m = p.add_argument_group("models")
    m.add_argument("--checkpoint", help="bagcert checkpoint (BagCert, Clipped BagNet, PatchGuard, PatchCleanser base)")
    m.add_argument("--drs-checkpoint", help="peer classifier of the DRS base classifier (train.py --peer drs-...: its spec sets the certifier)")
    m.add_argument(
        "--pc-checkpoint",
        help="PatchCleanser base classifier: a peer classifier (train.py --peer patchcleanser:P: its spec sets k, fill and "
        "the mask set) or a bagcert model checkpoint",
    )
    m.add_argument("--model", default="cifar_bagnet9_s2", help="backbone for random initialisation")
    m.add_argument("--width", type=int, default=32, help="width of randomly initialised backbones")
    m.add_argument("--seed", type=int, default=0, help="seed of random initialisation")
    c = p.add_argument_group("certifiers")
    c.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    c.add_argument("--band-size", type=int, help=f"DRS band width b (default: the checkpoint's spec, else {DRS_DEFAULTS['band_size']})")
    c.add_argument("--drs-mode", choices=("column", "block"), help=f"default: the checkpoint's spec, else {DRS_DEFAULTS['mode']}")
    c.add_argument("--drs-encoding", choices=("mask", "levine_feizi", "fill"), help=f"default: the checkpoint's spec, else {DRS_DEFAULTS['encoding']}")
    c.add_argument("--k", type=int, help=f"PatchCleanser masks per axis (default: the checkpoint's spec, else {PC_DEFAULTS['k']})")
    c.add_argument("--fill", type=float, help=f"PatchCleanser masked-pixel value (default: the checkpoint's spec, else {PC_DEFAULTS['fill']})")
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
    drs_flags = {"band_size": args.band_size, "mode": args.drs_mode, "encoding": args.drs_encoding}
    pc_flags = {"k": args.k, "fill": args.fill}
    drs = _drs_certifier(args, drs_flags, image_size, num_classes, patch)
    pc = _pc_certifier(args, pc_flags, image_size, num_classes, patch)
    if drs is None:  # no DRS checkpoint: the flags (or their defaults) configure the certifier of a random model
        d = {k: (DRS_DEFAULTS[k] if v is None else v) for k, v in drs_flags.items()}
        drs_cert = peers.DerandomizedSmoothing(d["band_size"], d["mode"], d["encoding"], batch_size=args.batch_size)
        if d["encoding"] == "fill":
            drs_model, drs_src = model, model_src
        else:
            torch.manual_seed(args.seed)
            drs_model = peers.ablation_classifier(backbone, num_classes, encoding=d["encoding"], **kwargs).eval()
            drs_src = f"RANDOM INIT {backbone} {kwargs} with a {d['encoding']!r}-encoding input ({drs_model.in_channels} channels)"
        drs = (drs_cert, drs_model, drs_src, None, patch)
    if pc is None:  # no PatchCleanser checkpoint: the bagcert model (or its random stand-in) is the base classifier
        d = {k: (PC_DEFAULTS[k] if v is None else v) for k, v in pc_flags.items()}
        pc = (peers.PatchCleanser(d["k"], d["fill"], batch_size=args.batch_size), model, model_src, None, patch)

    certifiers = {
        "bagcert": (peers.BagCert(batch_size=args.batch_size), model, model_src, None, patch),
        "clipped_bagnet": (peers.ClippedBagNet(batch_size=args.batch_size), model, model_src, None, patch),
        "patchguard": (peers.PatchGuardMasking(batch_size=args.batch_size), model, model_src, None, patch),
        "drs": drs,
        "patchcleanser": pc,
    }
    methods = ["bagcert"] + [m for m in args.methods if m != "bagcert"]  # BagCert is the cost reference
    results = {}
    with torch.inference_mode():
        for key in methods:
            # cert_patch: the patch the certifier is run with; for a trained PatchCleanser classifier, the patch of
            # its mask set (>= --patch-size in both dimensions, so it certifies --patch-size too)
            cert, net, src, spec, cert_patch = certifiers[key]
            cert.certify(net, x[:1], y[:1], cert_patch)  # warm-up (allocations, lazy init)
            t, c = time.perf_counter(), time.process_time()
            res = cert.certify(net, x, y, cert_patch)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            results[key] = {
                "name": cert.name,
                "weights": src,
                "random_init": src.startswith("RANDOM"),
                "spec": spec,
                "certified_with_patch_size": list(cert_patch),
                "clean_accuracy": res.clean_accuracy,
                "certified_accuracy": res.certified_accuracy,
                "certified_count": int(res.certified_correct.sum()),
                "correct_count": int(res.correct.sum()),
                "forward_passes_per_image": cert.forward_passes_per_image(image_size, cert_patch),
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
    for r in out["methods"].values():
        if r["spec"]:
            note = ""
            if tuple(r["certified_with_patch_size"]) != tuple(patch):
                h, w = r["certified_with_patch_size"]
                note = f"; certified with its mask set for {h}x{w} patches, which covers {patch[0]}x{patch[1]}"
            print(f"{r['name']}: peer spec {r['spec']} from the checkpoint{note}")
    if any(r["random_init"] for r in out["methods"].values()):
        print("NOTE: randomly initialised weights: accuracies are meaningless; only speed and cost are informative.")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _peer_file(path):
    """``(format, recorded spec or None)`` of a checkpoint file (clear errors for missing / foreign files)."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        return None, None
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return obj.get("format"), meta.get("peer")


def _check_flags(items, path, spec) -> None:
    """Refuse a flag that was given and contradicts the spec recorded in the checkpoint.

    ``items``: ``(flag, given value or None, recorded value, the given value as the spec records it)``."""
    bad = [f"{flag} {given} (the file records {recorded})" for flag, given, recorded, as_recorded in items
           if given is not None and as_recorded != recorded]
    if bad:
        raise SystemExit(
            f"{path} was trained for peer {spec}; {', '.join(bad)} would certify a different configuration. "
            "Leave the flag out (the file's spec is used) or give the matching value"
        )


def _check_classes(path, clf, num_classes):
    if clf.num_classes != num_classes:
        raise SystemExit(f"{path}: the classifier predicts {clf.num_classes} classes but the dataset has {num_classes}")


def _drs_certifier(args, flags: dict, image_size, num_classes, patch):
    """``(certifier, classifier, source, spec, certify patch)`` for ``--drs-checkpoint`` (None without one)."""
    path = args.drs_checkpoint
    if not path:
        return None
    fmt, recorded = _peer_file(path)
    if fmt == CHECKPOINT_FORMAT:
        raise SystemExit(f"--drs-checkpoint {path} is a bagcert model checkpoint; DRS needs a peer classifier (train.py --peer drs-column:B)")
    if recorded is None:  # a peer classifier saved by hand: the flags say how it is certified (the loader checks the format)
        clf, _ = peers.load_peer_classifier(path)
        d = {k: (DRS_DEFAULTS[k] if v is None else v) for k, v in flags.items()}
        cert = peers.DerandomizedSmoothing(d["band_size"], d["mode"], d["encoding"], batch_size=args.batch_size)
        if cert.encoding.channels != clf.in_channels:
            raise SystemExit(f"--drs-checkpoint {path} reads {clf.in_channels} channels; --drs-encoding {d['encoding']} feeds {cert.encoding.channels}")
        _check_classes(path, clf, num_classes)
        return cert, clf.eval(), f"peer classifier {path} (no recorded spec; flags)", None, patch
    cert, clf, meta = peers.load_peer_certifier(path, batch_size=args.batch_size)
    spec = peers.PeerSpec.from_dict(meta["peer"])
    if spec.method != "drs":
        raise SystemExit(f"--drs-checkpoint {path} is a {spec} classifier, not de-randomized smoothing; give it as --pc-checkpoint")
    _check_flags([("--band-size", flags["band_size"], spec.band_size, flags["band_size"]),
                  ("--drs-mode", flags["mode"], spec.mode, flags["mode"]),
                  ("--drs-encoding", flags["encoding"], spec.encoding, flags["encoding"])], path, spec)
    try:
        spec.check_image_size(image_size)
    except ValueError as e:
        raise SystemExit(f"--drs-checkpoint {path}: {e}") from None
    _check_classes(path, clf, num_classes)
    return cert, clf, f"peer classifier {path}", str(spec), patch


def _pc_certifier(args, flags: dict, image_size, num_classes, patch):
    """``(certifier, classifier, source, spec, certify patch)`` for ``--pc-checkpoint`` (None without one)."""
    path = args.pc_checkpoint
    if not path:
        return None
    fmt, recorded = _peer_file(path)
    if fmt != PEER_FORMAT:  # a bagcert model checkpoint (the loader reports anything else)
        net, _ = bagcert.load_checkpoint(path)
        d = {k: (PC_DEFAULTS[k] if v is None else v) for k, v in flags.items()}
        return peers.PatchCleanser(d["k"], d["fill"], batch_size=args.batch_size), net, f"checkpoint {path}", None, patch
    if recorded is None:  # a peer classifier saved by hand: the flags say how it is certified
        clf, _ = peers.load_peer_classifier(path)
        if clf.in_channels != 3:
            raise SystemExit(f"--pc-checkpoint {path} reads {clf.in_channels} channels; PatchCleanser feeds 3-channel images")
        _check_classes(path, clf, num_classes)
        d = {k: (PC_DEFAULTS[k] if v is None else v) for k, v in flags.items()}
        return peers.PatchCleanser(d["k"], d["fill"], batch_size=args.batch_size), clf.eval(), f"peer classifier {path} (no recorded spec; flags)", None, patch
    cert, clf, meta = peers.load_peer_certifier(path, batch_size=args.batch_size)
    spec = peers.PeerSpec.from_dict(meta["peer"])
    if spec.method != "patchcleanser":
        raise SystemExit(f"--pc-checkpoint {path} is a {spec} classifier, not PatchCleanser; give it as --drs-checkpoint")
    k_text = str(spec.k[0]) if spec.k[0] == spec.k[1] else f"{spec.k[0]}x{spec.k[1]}"
    _check_flags([("--k", flags["k"], k_text, None if flags["k"] is None else str(flags["k"])),
                  ("--fill", flags["fill"], spec.fill, flags["fill"])], path, spec)
    mask_patch = tuple(spec.patch_size)
    if patch[0] > mask_patch[0] or patch[1] > mask_patch[1]:
        raise SystemExit(
            f"--pc-checkpoint {path} was trained for peer {spec}: its mask set is built for {mask_patch[0]}x{mask_patch[1]} "
            f"patches and certifies patches up to that size only, not --patch-size {patch[0]}x{patch[1]} "
            "(certify.py --mask-patch-size certifies with a mask set rebuilt for a larger patch)"
        )
    try:
        spec.check_image_size(image_size)
    except ValueError as e:
        raise SystemExit(f"--pc-checkpoint {path}: {e}") from None
    _check_classes(path, clf, num_classes)
    return cert, clf, f"peer classifier {path}", str(spec), mask_patch


if __name__ == "__main__":
    sys.exit(main())
