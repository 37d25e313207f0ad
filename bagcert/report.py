"""Reports: JSON (canonical), per-sample CSV, Markdown summary and a figure.

``results.json`` schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "tool": "bagcert.certify", "bagcert_version": str, "torch_version": str, "git_sha": str | null,
      "created": ISO-8601 UTC, "device": str, "hardware": str,
      "config": {...command-line options...},
      "checkpoint": {"path": str, "model": str, "metadata": {...}} | null,
      "dataset": {"name": str, "root": str | null, "split": str, "num_images": int},
      "aggregation": str,
      "clean_accuracy": float,
      "certified_accuracy": {"<size>": float, ...},      # size '5' or '3x7' (height x width, pixels)
      "certified_count": {"<size>": int, ...}, "correct_count": int, "num_images": int,
      "images_per_s": float,                             # images / wall time of forward + certificates
      "certify_forward_ratio": float,                    # (forward + certificates) / forward time
      "timing": {"forward_s": float, "certify_s": float, "total_s": float}
    }

``per_sample.csv``: one row per image: index, label, prediction, correct, then for each patch size
``certified_<size>``, ``margin_<size>``, ``worst_row_<size>``, ``worst_col_<size>``.
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

__all__ = ["write_certification_report", "git_sha", "hardware_string", "SCHEMA_VERSION", "environment_info"]


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware_string(device="cpu") -> str:
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
    return f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


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


def write_certification_report(output, results: dict, timing: dict, config: dict, dataset: dict, checkpoint: dict | None, device="cpu") -> dict:
    """Write results.json, per_sample.csv, summary.md and certified_accuracy.png into ``output``.

    ``results`` maps size keys ('5', '3x7') to :class:`~bagcert.certification.CertResult`.
    Returns the JSON summary dict.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    n = first.num_samples
    summary = {"schema_version": SCHEMA_VERSION, "tool": "bagcert.certify", **environment_info(device)}
    summary.update(
        {
            "config": config,
            "checkpoint": checkpoint,
            "dataset": dict(dataset, num_images=n),
            "aggregation": first.aggregation,
            "num_images": n,
            "correct_count": int(first.correct.sum()),
            "clean_accuracy": first.clean_accuracy,
            "certified_accuracy": {k: r.certified_accuracy for k, r in results.items()},
            "certified_count": {k: int(r.certified_correct.sum()) for k, r in results.items()},
            "images_per_s": n / timing["total_s"] if timing["total_s"] > 0 else None,
            "certify_forward_ratio": (timing["forward_s"] + timing["certify_s"]) / timing["forward_s"] if timing["forward_s"] > 0 else None,
            "timing": {k: timing[k] for k in ("forward_s", "certify_s", "total_s")},
        }
    )
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "per_sample.csv", _per_sample_csv(results))
    atomic_write_text(out / "summary.md", _markdown(summary))
    _plot(out / "certified_accuracy.png", summary)
    return summary


def _per_sample_csv(results) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = list(results)
    first = results[keys[0]]
    header = ["index", "label", "prediction", "correct"]
    for k in keys:
        header += [f"certified_{k}", f"margin_{k}", f"worst_row_{k}", f"worst_col_{k}"]
    w.writerow(header)
    cols = [first.label.tolist(), first.prediction.tolist(), first.correct.int().tolist()]
    per = []
    for k in keys:
        r = results[k]
        m = r.margin
        per += [r.certified.int().tolist(), (m.tolist() if not m.is_floating_point() else [f"{v:.6g}" for v in m.tolist()]), r.worst_position[:, 0].tolist(), r.worst_position[:, 1].tolist()]
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
    return "\n".join(lines)


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
