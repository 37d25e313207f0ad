"""Shared steps of the report runs (bagcert.runs): model and data loading with the user's mistakes as one-line
``ValueError`` s, the report folder (results.json + summary.md + figures, staged and moved into place as one set,
:class:`bagcert.report.ReportFolder`), and the small formatting helpers of the reports.

Every refusal here is a :class:`~bagcert.runs._checks.RunInputError` (a ``ValueError``), or a
:class:`~bagcert.report.ReportFolderError` for the report folder, whose message is one line naming the input the
way the command line spells it (``--checkpoint m.pt: ...``, ``--num-eval 20 is larger than ...``); nothing exits.
bagcert/cli/_common.py turns them into ``SystemExit`` for the tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import RunInputError

__all__ = ["AnalysisReport", "one_line", "input_errors", "import_model_modules", "check_workers_apply", "checkpoint_input_size", "subset", "load_model_and_data", "dataset_info",
           "check_output_outside_dataset", "prepare_output", "commit_report", "write_report_files", "json_line", "show_path",
           "progress_bar", "plt_or_none", "save_figure", "pct"]


@dataclass(frozen=True)
class AnalysisReport:
    """What a report run returns.

    Attributes:
        results: the ``results.json`` document (environment, tool, run id, config, results).
        markdown: the ``summary.md`` text.
        summary: the one-line summary (the tools print it as the last line, JSON).
        output: the report folder the files were moved into.
    """

    results: dict
    markdown: str
    summary: dict
    output: Path


def one_line(text) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def input_errors(prefix: str = "", error: type = RunInputError, passing: tuple = ()):
    """Re-raise the errors about the user's input raised inside the block --
    :class:`~bagcert.checkpoint.CheckpointError` and the ``ValueError`` / ``TypeError`` of argument checks
    (``DatasetError``, ``ReportFolderError``, ``PatchFileError`` are ``ValueError`` s) -- as one ``error`` (default
    :class:`~bagcert.runs._checks.RunInputError`) line ``<prefix><message>``, the original as its ``__cause__``; an
    exception of a type in ``passing`` goes through unchanged. Wrap only the steps that read and check the user's
    input, never the computation."""
    from ..checkpoint import CheckpointError

    try:
        yield
    except passing:
        raise
    except (CheckpointError, ValueError, TypeError) as e:
        raise error(one_line(f"{prefix}{e}")) from e


def import_model_modules(modules) -> None:
    """Import the ``--model-module`` files / modules (None: none given); a ``RunInputError`` with one line names the
    first that cannot be imported: not found, or the exception its code raised, with its file and line."""
    from ..models import PluginError, load_model_module

    for module in modules or ():
        try:
            load_model_module(module)
        except PluginError as e:
            raise RunInputError(one_line(f"--model-module {module}: {e.detail}")) from e


def check_workers_apply(workers_given: int | None, requested: str, chosen: str, flag: str = "--workers") -> None:
    """``--workers`` read the images of the stream path only. Given (not None, not 0) with ``--data-path memory``
    it can never apply: ``RunInputError`` with one line. Given with ``--data-path auto`` that chose the memory path,
    stderr says it is unused (the choice was not the user's). The rule of every tool: an option that the command
    line itself makes inapplicable is refused; one made moot by an automatic choice is said on stderr."""
    if not workers_given or chosen != "memory":
        return
    if requested == "memory":
        raise RunInputError(f"{flag} {workers_given} applies to the stream path only; --data-path memory decodes every image "
                            f"in this process (drop {flag}, or give --data-path stream)")
    print(f"note: {flag} {workers_given} is unused: --data-path auto chose the memory path (give --data-path stream to "
          "decode in loader processes)", file=sys.stderr, flush=True)


def checkpoint_input_size(meta: dict, path, default: int = 32) -> int:
    """The checkpoint's ``input_size`` metadata (``default`` when absent), checked: an int >= 1 (and a ``resize``
    >= it), else ``RunInputError`` with one line naming the file."""
    size = meta.get("input_size", default) if isinstance(meta, dict) else default
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RunInputError(f"{path}: malformed metadata: input_size is {size!r}, expected a positive int (pixels)")
    resize = meta.get("resize") if isinstance(meta, dict) else None
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < size):
        raise RunInputError(f"{path}: malformed metadata: resize is {resize!r}, expected a positive int >= input_size {size}")
    return size


def subset(data, num: int | None, seed: int, flag: str = "the number of images", default: int | None = None):
    """The first ``num`` images of a seeded permutation (sorted), or all when ``num`` is None.

    A ``num`` larger than the data set is refused (``RunInputError`` naming ``flag``): nothing is silently
    clipped. ``default`` is the value used when ``num`` is None; a default larger than the data set takes
    every image and says so on stderr."""
    if num is None:
        if default is None or default >= len(data):
            if default is not None and default > len(data):
                print(f"{flag} (default {default}): the data set has only {len(data)} images; using all of them", file=sys.stderr)
            return data
        num = default
    if num < 1:
        raise RunInputError(f"{flag} must be >= 1, got {num}")
    if num > len(data):
        raise RunInputError(f"{flag} {num} is larger than the data set ({len(data)} images); give at most {len(data)}")
    if num == len(data):
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:num].sort().values)


def load_model_and_data(checkpoint: str, dataset: str, split: str, seed: int, num: int | None, flag: str = "the number of images",
                        default: int | None = None, cache: bool = True):
    """``(model, meta, data)``; the dataset is resized to the checkpoint's ``input_size`` / ``resize``, and a
    folder without split folders is cut with the checkpoint's seeded split (``bagcert.data.load_checkpoint_split``).
    ``num`` / ``flag`` / ``default``: see :func:`subset`; ``cache=False`` bypasses the decode cache. A bad
    checkpoint or dataset is a ``RunInputError`` with one line."""
    from ..checkpoint import load_checkpoint
    from ..data import load_checkpoint_split

    with input_errors(f"--checkpoint {checkpoint}: "):
        model, meta = load_checkpoint(checkpoint)
    size = checkpoint_input_size(meta, checkpoint)
    # a folder without split folders: the part of the checkpoint's seeded split ('all': every image)
    with input_errors(f"dataset {dataset}, split {split}: "):
        data = load_checkpoint_split(dataset, split, meta.get("split"), size=size, resize=meta.get("resize"), seed=seed,
                                     num_classes=model.num_classes, cache=cache)
    if len(data) == 0:
        raise RunInputError(f"dataset {dataset}, split {split}: no images")
    if len(data.classes) != model.num_classes:
        raise RunInputError(f"dataset {dataset} has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes) and data.name != "synthetic":
        raise RunInputError(f"dataset classes {data.classes} differ from the checkpoint's classes {meta['classes']}")
    return model, meta, subset(data, num, seed, flag, default)


def dataset_info(data, split: str) -> dict:
    return {"name": data.name, "root": data.info.get("root"), "split": data.info.get("split", split), "num_images": len(data)}


def show_path(path) -> str:
    """``path`` as the tools print it: relative to the working directory when it lies inside it, else absolute."""
    p = Path(os.path.abspath(os.fspath(path)))
    cwd = Path(os.getcwd())
    try:
        return str(p.relative_to(cwd)) or "."
    except ValueError:
        return str(p)


def check_output_outside_dataset(output, dataset, flag: str = "--output") -> None:
    """Refuse (``RunInputError``, one line) an output folder that is the dataset folder or lies inside it: a report
    or run folder there would be listed as one more class folder by every later run on that dataset.
    ``dataset`` is a dataset spec (``synthetic[:N]``, ``cifar10:<root>``, ``folder:<root>`` or a path)."""
    from ..data import _is_synthetic, _spec_root

    if output is None or dataset is None or _is_synthetic(str(dataset)):
        return
    root = _spec_root(str(dataset))
    if not root.is_dir():
        return
    out, root = Path(os.path.realpath(os.fspath(output))), Path(os.path.realpath(root))
    if out == root or root in out.parents:
        raise RunInputError(f"{flag} {output} lies inside the dataset folder {show_path(root)}: every later run would read it "
                         "as one more class folder; write outside the dataset")


def prepare_output(path, overwrite: bool = False, default_folder: bool = False, dataset=None):
    """Check, before any work, that the report folder ``path`` can be written, and return its
    :class:`~bagcert.report.ReportFolder` (nothing is created yet). A path that is a file or lies under
    one, an unwritable parent, a folder of other files, or a folder holding a report without ``overwrite``
    is a :class:`~bagcert.report.ReportFolderError` (``--output: ...``, one line).

    ``default_folder``: ``path`` is the tool's default folder, not one the user named. A bagcert report already
    there is then replaced without ``overwrite``, and stderr says so; a folder holding other files is still refused.
    ``dataset``: the run's dataset spec; an output folder inside that dataset's folder is refused
    (:func:`check_output_outside_dataset`)."""
    from ..report import ReportFolder, ReportFolderError, _one_report_tool

    check_output_outside_dataset(path, dataset)
    if default_folder and not overwrite and Path(path).is_dir() and _one_report_tool(Path(path)) is not None:
        overwrite = True
        print(f"replacing the previous report in {show_path(path)} (default folder; pass --output to keep reports)",
              file=sys.stderr, flush=True)
    try:
        return ReportFolder(path, overwrite=overwrite)
    except ReportFolderError as e:
        raise ReportFolderError(f"--output: {one_line(e)}") from None


def commit_report(folder) -> Path:
    """Move ``folder``'s staged report into place (:meth:`bagcert.report.ReportFolder.commit`); a folder taken
    meanwhile is a :class:`~bagcert.report.ReportFolderError` (``--output: ...``) saying where the report was left."""
    from ..report import ReportFolderError

    try:
        return folder.commit()
    except ReportFolderError as e:
        raise ReportFolderError(f"--output: {one_line(e)}") from None


def _default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def json_line(obj: dict) -> str:
    return json.dumps(obj, default=_default, separators=(", ", ": "))


def write_report_files(folder, tool: str, config: dict, results: dict, markdown: str, device: str = "cpu") -> dict:
    """Write ``results.json`` (environment, tool, run id, config, results) and ``summary.md`` into the staging
    folder of ``folder`` (a :class:`~bagcert.report.ReportFolder`); the caller adds figures and commits. Returns
    the results.json document."""
    from ..checkpoint import atomic_write_text
    from ..report import environment_info

    out = folder.stage()
    doc = {"schema_version": 1, "tool": tool, "run_id": folder.run_id, **environment_info(device), "config": config, **results}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=_default) + "\n")
    atomic_write_text(out / "summary.md", markdown)
    return doc


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None, unit: str = "it"):
    """``iterable`` wrapped in a tqdm bar on stderr when ``enabled`` (else unchanged)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=1.0, file=sys.stderr)


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


# ------------------------------------------------------------------------------------------------
# the options every report run shares: seed, threads, output, overwrite, quiet, cache
# ------------------------------------------------------------------------------------------------
def set_field(config, name: str, value) -> None:
    """Store a normalised value on a frozen config dataclass (in its ``__post_init__``)."""
    object.__setattr__(config, name, value)


@dataclass(frozen=True, kw_only=True)
class ReportRunOptions:
    """The options every report run's config has (the base of :class:`~bagcert.runs.RoiConfig`,
    :class:`~bagcert.runs.DefensivePatchConfig`, :class:`~bagcert.runs.ImageNetAConfig`), checked by
    :func:`check_run_fields`: ``seed`` (int), ``threads`` (torch threads, None: torch's default), ``output`` (the report
    folder, None: the tool's default folder), ``overwrite`` (replace a report there), ``quiet`` (no summary on stdout),
    ``cache`` (the decode cache of :mod:`bagcert.data`)."""

    seed: int = 0
    threads: int | None = None
    output: str | None = None
    overwrite: bool = False
    quiet: bool = False
    cache: bool = True


def check_run_fields(config) -> None:
    """Check and normalise the fields every report run has (``seed``, ``threads``, ``output``, ``overwrite``,
    ``quiet``, ``cache``); ``FieldError`` naming the field."""
    from . import _checks

    if not _checks._is_int(config.seed):
        raise _checks.FieldError("seed", f"must be an integer, got {config.seed!r}")
    set_field(config, "seed", int(config.seed))
    set_field(config, "threads", _checks.check_positive_int("threads", config.threads, allow_none=True))
    set_field(config, "output", _checks.check_path("output", config.output, allow_none=True))
    for name in ("overwrite", "quiet", "cache"):
        _checks.check_bool(name, getattr(config, name))


def output_path(config, default: str) -> str:
    """The report folder of ``config``: its ``output``, or the run's ``default`` folder when it is None."""
    return default if config.output is None else config.output


def apply_threads(config) -> None:
    """``config.threads``: torch CPU threads (None: torch's own choice)."""
    if config.threads:
        torch.set_num_threads(config.threads)


def start_report_run(config, config_type: type, run_name: str, default_output: str):
    """The start every report run shares, before any work: ``config`` must be a ``config_type`` (``TypeError``
    otherwise), its threads are applied, and its report folder (``output`` or ``default_output``) is checked with
    :func:`prepare_output` (written at the end as one set: the default folder is replaced, an explicit one needs
    ``overwrite``). Returns ``(out, folder)``: the folder's Path and prepare_output's handle."""
    if not isinstance(config, config_type):
        article = "an" if config_type.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{run_name} needs {article} {config_type.__name__}, got {type(config).__name__}")
    apply_threads(config)
    out = Path(output_path(config, default_output))
    folder = prepare_output(out, config.overwrite, default_folder=config.output is None, dataset=config.dataset)
    return out, folder


def recorded_config(config, default_output: str, **resolved) -> dict:
    """The config as results.json records it: every field (lists for tuples), the report folder actually written,
    and the ``resolved`` values (a default made concrete)."""
    from dataclasses import fields

    out = {}
    for f in fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    out["output"] = output_path(config, default_output)
    out.update(resolved)
    return out
