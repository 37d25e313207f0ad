"""Shared pieces of the ``python -m bagcert.cli.*`` tools: argument parsing helpers, data loading,
and the report writer (results.json + summary.md + figures, each written atomically)."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

__all__ = ["positive_int", "nonnegative_int", "add_run_arguments", "set_threads", "parse_number", "parse_list", "load_model_and_data", "write_report", "plt_or_none", "save_figure", "json_line"]


def _int_at_least(text, minimum: int, expected: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return value


def positive_int(text) -> int:
    """``"4"`` -> 4; zero, negative or non-integer text is refused (argparse ``type=``)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text) -> int:
    """``"0"`` -> 0; negative or non-integer text is refused (argparse ``type=``), for counts where 0 means none."""
    return _int_at_least(text, 0, "an integer >= 0")


def add_run_arguments(p: argparse.ArgumentParser, output: str) -> None:
    """``--seed``, ``--threads``, ``--output`` (default ``output``) and ``--quiet``: the same in every report tool."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--output", default=output, help="report folder")
    p.add_argument("--quiet", action="store_true", help="print only the final JSON line")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (torch's own choice when it is not given)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_number(text) -> float:
    """``"0.03"``, ``"8/255"`` -> float (argparse ``type=``)."""
    try:
        value = float(Fraction(str(text).strip())) if "/" in str(text) else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (give e.g. 0.03 or 8/255)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def parse_list(text: str, kind=int, name: str = "list") -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except (ValueError, argparse.ArgumentTypeError):
        raise SystemExit(f"--{name}: cannot read {text!r} as a comma-separated list of {kind.__name__} values") from None


def subset(data, num: int | None, seed: int):
    """The first ``num`` images of a seeded permutation (sorted), or all."""
    if num is None or num >= len(data):
        return data
    if num < 1:
        raise SystemExit(f"the number of images must be >= 1, got {num}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:num].sort().values)


def load_model_and_data(checkpoint: str, dataset: str, split: str, seed: int, num: int | None):
    """``(model, meta, data)``; the dataset is resized to the checkpoint's ``input_size`` / ``resize``, and a
    folder without split folders is cut with the checkpoint's seeded split (``bagcert.data.load_checkpoint_split``)."""
    from ..checkpoint import load_checkpoint
    from ..data import DatasetError, load_checkpoint_split

    model, meta = load_checkpoint(checkpoint)
    size = int(meta.get("input_size", 32))
    try:  # a folder without split folders: the part of the checkpoint's seeded split ('all': every image)
        data = load_checkpoint_split(dataset, split, meta.get("split"), size=size, resize=meta.get("resize"), seed=seed,
                                     num_classes=model.num_classes)
    except DatasetError as e:
        raise SystemExit(f"dataset {dataset}, split {split}: {e}") from None
    if len(data.classes) != model.num_classes:
        raise SystemExit(f"dataset {dataset} has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes) and data.name != "synthetic":
        raise SystemExit(f"dataset classes {data.classes} differ from the checkpoint's classes {meta['classes']}")
    return model, meta, subset(data, num, seed)


def dataset_info(data, split: str) -> dict:
    return {"name": data.name, "root": data.info.get("root"), "split": data.info.get("split", split), "num_images": len(data)}


def _default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def json_line(obj: dict) -> str:
    return json.dumps(obj, default=_default, separators=(", ", ": "))


def write_report(output, tool: str, config: dict, results: dict, markdown: str, device: str = "cpu") -> dict:
    """Write ``results.json`` (environment, tool, config, results) and ``summary.md`` into ``output``."""
    from ..checkpoint import atomic_write_text
    from ..report import environment_info

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": 1, "tool": tool, **environment_info(device), "config": config, **results}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=_default) + "\n")
    atomic_write_text(out / "summary.md", markdown)
    return doc


def plt_or_none():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path) -> None:
    """Save a matplotlib figure atomically (temporary file in the same folder, then rename)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"
