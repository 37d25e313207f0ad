"""Reports: JSON (canonical), per-sample CSV, Markdown summary and figures.

``results.json`` schema (``schema_version`` 1; the ``empirical``, ``certified_broken``, ``method``,
``forward_passes_per_image`` and ``peer`` keys were added without breaking older readers)::

    {
      "schema_version": 1,
      "tool": "bagcert.certify", "bagcert_version": str, "torch_version": str, "git_sha": str | null,
      "created": ISO-8601 UTC, "device": str, "hardware": str,
      "config": {...command-line options...},
      "checkpoint": {"path": str, "model": str, "model_kwargs": {...}, "metadata_summary": {...}} | null,
                                                         # peer classifiers also "format", "in_channels"; the model
                                                         # is the backbone, metadata_summary holds "peer"
      "dataset": {"name": str, "root": str | null, "split": str, "num_images": int},
      "aggregation": str,                                # bagcert models: votes / majority / clipped; peers: = method
      "method": str,                                     # "bagcert" for a bagcert model, else the peer certifier's
                                                         # name: "drs-column-b4", "drs-block-b12", "patchcleanser-k6"
      "forward_passes_per_image": int,                   # network evaluations per image (1 for a bagcert model)
      "peer": null | {                                   # null for a bagcert model; else the spec recorded in the
        "spec": str, "method": "drs" | "patchcleanser", ...,   # peer classifier (bagcert.peers.PeerSpec.to_dict; its
                                                         #   num_masks = masks per training image) plus
        "affected_ablations": {"<size>": int, ...},      #   DRS: Δ, ablations a patch of each size meets
        "mask_set": {"patch_size": [h, w], "rebuilt": bool, "k": [kr, kc], "num_masks": int, "mask_size": [h, w],
                     "stride": [h, w], "row_starts": [int, ...], "col_starts": [int, ...], "fill": float}
      },                                                 #   PatchCleanser: the mask set certified with
      "clean_accuracy": float,
      "certified_accuracy": {"<size>": float, ...},      # size '5' or '3x7' (height x width, pixels)
      "certified_count": {"<size>": int, ...}, "correct_count": int, "num_images": int,
      "images_per_s": float,                             # images / wall time of forward + certificates
      "certify_forward_ratio": float,                    # (forward + certificates) / forward time; peers: forward
                                                         # = all network evaluations (ablations, masked images)
      "timing": {"forward_s": float, "certify_s": float, "total_s": float},
      "certified_broken": {"<size>": int, ...},          # {} without --attacks; anything > 0 is a soundness bug
      "empirical": null | {                              # null without --attacks
        "attacks": [str, ...],                           # requested: pgd, pgd-adaptive, universal, imagenet-patch, feature-space
        "num_images_attacked": int, "subset_seed": int,  # the first N of a seeded permutation of the certified images
        "settings": {"<attack>": {...}, ...},            # steps, step size, locations, surrogate, seed, ...
        "skipped": {"<attack>": str, ...},               # why an attack did not run (e.g. imagenet-patch on CIFAR)
        "notes": [str, ...],
        "per_size": {"<size>": {
          "patch_size": [h, w], "num_images": int,
          "clean_accuracy": float, "certified_accuracy": float,      # on the attacked images
          "robust_accuracy": {"<attack>": float, ...},               # empirical robust accuracy per attack
          "overall_robust_accuracy": float | null,                   # robust against every image-space attack
          "overall_attacks": [str, ...],                             #   inside the threat model
          "in_threat_model": {"<attack>": bool, ...},                # every patch fit in the certified rectangle
          "certified_broken": int, "broken_by": {"<attack>": [int, ...]},   # indices into the attacked subset
          "feature_space_mismatch": int | null,                      # feature-space broken != not certified
          "prediction_mismatch": int,
          "time_s": {"<attack>": float, ...}, "attack_info": {"<attack>": {...}},
          "figures": [str, ...]
        }, ...}
      }
    }

``per_sample.csv``: one row per image: index, label, prediction, correct, then for each patch size
``certified_<size>``, ``margin_<size>``, ``worst_row_<size>``, ``worst_col_<size>``; with attacks also
``attacked`` (1/0) and ``robust_<attack>_<size>`` (1/0, empty for images that were not attacked).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from . import __version__
from .checkpoint import atomic_write_text

SCHEMA_VERSION = 1

__all__ = [
    "write_certification_report",
    "git_sha",
    "hardware_string",
    "SCHEMA_VERSION",
    "environment_info",
    "plot_attack_examples",
    "plot_uncertified_positions",
]


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware_string(device="cpu", threads: int | None = None) -> str:
    """The GPU's name, or the CPU's model, core count and torch threads (``threads``: those of the measured
    process, when it is not this one; default this process's)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads() if threads is None else threads}"


def environment_info(device="cpu") -> dict:
    return {
        "bagcert_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "git_sha": git_sha(),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "device": str(device),
        "hardware": hardware_string(device),
    }


def write_certification_report(output, results: dict, timing: dict, config: dict, dataset: dict, checkpoint: dict | None, device="cpu", empirical: dict | None = None, method: dict | None = None) -> dict:
    """Write results.json, per_sample.csv, summary.md and certified_accuracy.png into ``output``.

    ``results`` maps size keys ('5', '3x7') to :class:`~bagcert.certification.CertResult`.
    ``method`` (optional): ``{"method": str, "forward_passes_per_image": int, "peer": dict | None}``; the
    default describes a bagcert model (``"bagcert"``, 1 pass, no peer).
    ``empirical`` (optional): ``{"summary": <the "empirical" JSON object>, "indices": [attacked image indices],
    "robust": {size_key: {attack: bool tensor over the attacked images}}}``.
    Returns the JSON summary dict.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    n = first.num_samples
    method = method or {"method": "bagcert", "forward_passes_per_image": 1, "peer": None}
    summary = {"schema_version": SCHEMA_VERSION, "tool": "bagcert.certify", **environment_info(device)}
    summary.update(
        {
            "config": config,
            "checkpoint": checkpoint,
            "dataset": dict(dataset, num_images=n),
            "aggregation": first.aggregation,
            "method": method["method"],
            "forward_passes_per_image": int(method["forward_passes_per_image"]),
            "peer": method.get("peer"),
            "num_images": n,
            "correct_count": int(first.correct.sum()),
            "clean_accuracy": first.clean_accuracy,
            "certified_accuracy": {k: r.certified_accuracy for k, r in results.items()},
            "certified_count": {k: int(r.certified_correct.sum()) for k, r in results.items()},
            "images_per_s": n / timing["total_s"] if timing["total_s"] > 0 else None,
            "certify_forward_ratio": (timing["forward_s"] + timing["certify_s"]) / timing["forward_s"] if timing["forward_s"] > 0 else None,
            "timing": {k: timing[k] for k in ("forward_s", "certify_s", "total_s")},
            "certified_broken": {k: v["certified_broken"] for k, v in empirical["summary"]["per_size"].items()} if empirical else {},
            "empirical": empirical["summary"] if empirical else None,
        }
    )
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "per_sample.csv", _per_sample_csv(results, empirical))
    atomic_write_text(out / "summary.md", _markdown(summary))
    _plot(out / "certified_accuracy.png", summary)
    return summary


def _per_sample_csv(results, empirical=None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = list(results)
    first = results[keys[0]]
    header = ["index", "label", "prediction", "correct"]
    for k in keys:
        header += [f"certified_{k}", f"margin_{k}", f"worst_row_{k}", f"worst_col_{k}"]
    cols = [first.label.tolist(), first.prediction.tolist(), first.correct.int().tolist()]
    per = []
    for k in keys:
        r = results[k]
        m = r.margin
        per += [r.certified.int().tolist(), (m.tolist() if not m.is_floating_point() else [f"{v:.6g}" for v in m.tolist()]), r.worst_position[:, 0].tolist(), r.worst_position[:, 1].tolist()]
    if empirical:
        n = first.num_samples
        attacked = [0] * n
        for i in empirical["indices"]:
            attacked[i] = 1
        header.append("attacked")
        per.append(attacked)
        for k, by_attack in empirical["robust"].items():
            for name, flags in by_attack.items():
                col = [""] * n
                for i, f in zip(empirical["indices"], flags.tolist()):
                    col[i] = int(f)
                header.append(f"robust_{name}_{k}")
                per.append(col)
    w.writerow(header)
    for i in range(first.num_samples):
        w.writerow([i] + [c[i] for c in cols] + [c[i] for c in per])
    return buf.getvalue()


def _markdown(s: dict) -> str:
    lines = [
        "# Certification report",
        "",
        f"- dataset: {s['dataset'].get('name')} ({s['num_images']} images, split {s['dataset'].get('split')})",
        f"- checkpoint: {s['checkpoint']['path'] if s.get('checkpoint') else 'none'}",
        f"- aggregation: {s['aggregation']}",
        *_markdown_method(s),
        f"- device: {s['device']} ({s['hardware']})",
        f"- bagcert {s['bagcert_version']}, torch {s['torch_version']}, git {s['git_sha'] or 'unknown'}, {s['created']}",
        "",
        f"Clean accuracy: **{100 * s['clean_accuracy']:.2f} %** ({s['correct_count']} / {s['num_images']})",
        "",
        "| patch (pixels) | certified accuracy | certified and correct |",
        "| --- | ---: | ---: |",
    ]
    for k, v in s["certified_accuracy"].items():
        lines.append(f"| {k if 'x' in k else f'{k}x{k}'} | {100 * v:.2f} % | {s['certified_count'][k]} |")
    lines += [
        "",
        f"Throughput: {s['images_per_s']:.1f} images/s; certify / forward time ratio {s['certify_forward_ratio']:.3f}.",
        "",
    ]
    if s.get("empirical"):
        lines += _markdown_empirical(s["empirical"])
    return "\n".join(lines)


def _markdown_method(s: dict) -> list:
    """The certification method, its network evaluations per image and, for a peer, its spec / mask set."""
    method = s.get("method")
    if method is None:
        return []
    lines = [f"- method: {method} ({s.get('forward_passes_per_image')} network evaluations per image)"]
    peer = s.get("peer")
    if peer:
        lines.append(f"- peer spec: `{peer.get('spec')}`")
        ms = peer.get("mask_set")
        if ms:
            note = " (rebuilt with --mask-patch-size, not the mask set the classifier was trained with)" if ms.get("rebuilt") else ""
            lines.append(
                f"- mask set: {ms['num_masks']} masks of {ms['mask_size'][0]}x{ms['mask_size'][1]} px built for "
                f"{ms['patch_size'][0]}x{ms['patch_size'][1]} patches{note}; it certifies every patch size up to that one"
            )
    return lines


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _markdown_empirical(e: dict) -> list:
    ran = [a for a in e["attacks"] if a not in e.get("skipped", {})]
    lines = [
        "## Empirical robustness (attacks) next to the certificate",
        "",
        f"{e['num_images_attacked']} images attacked (seeded subset, seed {e['subset_seed']}). Empirical robust accuracy is the",
        "fraction still classified correctly after the attack; it can never be below the certified accuracy on the",
        "same images. `overall` = robust against every image-space attack inside the threat model. `certified broken`",
        "counts certified samples some attack broke: anything but 0 is a soundness bug.",
        "",
        "| " + " | ".join(["patch", "certified"] + ran + ["overall", "certified broken"]) + " |",
        "| --- | " + " | ".join("---:" for _ in range(len(ran) + 3)) + " |",
    ]
    for k, r in e["per_size"].items():
        cells = []
        for a in ran:
            v = _pct(r["robust_accuracy"].get(a))
            if a in r["in_threat_model"] and not r["in_threat_model"][a]:
                v += " (outside threat model)"
            cells.append(v)
        broken = r["certified_broken"]
        row = [k if "x" in k else f"{k}x{k}", _pct(r["certified_accuracy"])] + cells
        row += [_pct(r["overall_robust_accuracy"]), str(broken) if not broken else f"**{broken} SOUNDNESS VIOLATION**"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for a, why in e.get("skipped", {}).items():
        lines.append(f"- {a} skipped: {why}")
    for note in e.get("notes", []):
        lines.append(f"- {note}")
    figs = [f for r in e["per_size"].values() for f in r.get("figures", [])]
    if figs:
        lines.append("- figures: " + ", ".join(figs))
    lines.append("")
    return lines


def _plot(path: Path, s: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(s["certified_accuracy"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(keys)), [100 * s["certified_accuracy"][k] for k in keys], color="tab:blue", label="certified")
    ax.axhline(100 * s["clean_accuracy"], color="tab:gray", ls="--", label="clean")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k if "x" in k else f"{k}x{k}" for k in keys])
    ax.set_xlabel("patch size (pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"{s['dataset'].get('name')}, n={s['num_images']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path, plt) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _name(classes, i) -> str:
    i = int(i)
    return str(classes[i]) if classes is not None and 0 <= i < len(classes) else str(i)


def plot_attack_examples(path, images, labels, clean_pred, adversarial: dict, classes=None, title: str = "") -> bool:
    """One row per image: the clean image, then each attack's patched image, titled with the predictions.

    ``adversarial`` maps attack names to ``(adv_images [k, 3, H, W], predictions [k])``. Returns False when
    matplotlib is not installed (nothing written)."""
    plt = _pyplot()
    if plt is None:
        return False
    k = images.shape[0]
    names = list(adversarial)
    cols = 1 + len(names)
    fig, axes = plt.subplots(k, cols, figsize=(1.9 * cols, 2.0 * k), squeeze=False)
    for i in range(k):
        panels = [("clean", images[i], clean_pred[i])] + [(n, adversarial[n][0][i], adversarial[n][1][i]) for n in names]
        for j, (name, img, pred) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ok = int(pred) == int(labels[i])
            ax.set_title(f"{name}\npred {_name(classes, pred)}", fontsize=7, color="black" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(f"label {_name(classes, labels[i])}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path), plt)
    return True


def plot_uncertified_positions(path, images, position_margins, labels, predictions, certified, patch_size, classes=None) -> bool:
    """Per image: the image and the map of patch positions (top-left pixel) the certificate cannot rule out
    (``position_margins <= 0``); ``certified`` is the certificate's flag (of the prediction, right or wrong).
    Returns False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    k = images.shape[0]
    fig, axes = plt.subplots(2, k, figsize=(2.0 * k, 4.2), squeeze=False)
    ph, pw = patch_size
    for i in range(k):
        axes[0][i].imshow(images[i].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[0][i].set_title(f"label {_name(classes, labels[i])}\npred {_name(classes, predictions[i])}", fontsize=7)
        bad = (position_margins[i] <= 0).float().cpu().numpy()
        axes[1][i].imshow(bad, cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
        state = "not certified" if not bool(certified[i]) else ("certified" if int(predictions[i]) == int(labels[i]) else "certified, wrong class")
        axes[1][i].set_title(f"{state}\n{int(bad.sum())} open positions", fontsize=7)
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{ph}x{pw} patch: positions (top-left pixel) the certificate cannot rule out, in red", fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path), plt)
    return True
