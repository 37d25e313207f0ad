"""Shared pieces of the ``python -m bagcert.cli.*`` tools and ``certify.py``: argument parsing helpers,
one-line errors, data loading, and the report folder (results.json + summary.md + figures, written into a
private staging folder and moved into place as one set, see :class:`bagcert.report.ReportFolder`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import signal
import sys
import threading
from pathlib import Path

from ..runs import _checks, _io

__all__ = ["Parser", "HelpFormatter", "positive_int", "nonnegative_int", "bounded_number", "positive_number", "nonnegative_number",
           "unit_number", "workers", "check_workers_apply", "check_output_outside_dataset", "device", "add_run_arguments", "add_cache_argument", "set_threads", "parse_number", "parse_list",
           "one_line", "exit_on_sigterm", "user_errors", "run_errors", "config_from_args", "run_report", "prepare_output", "commit_report", "checkpoint_input_size", "load_model_and_data", "write_report",
           "plt_or_none", "save_figure", "json_line", "add_output_arguments", "output_is_default", "show_path",
           "written_message", "progress_bar", "add_model_module_argument", "import_model_modules"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The tools' ``--help``: the description as written (examples keep their lines) and every option's
    default after its help (``(default: ...)``; options without a default and flags that take no value, such as
    ``--no-cache``, show none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "default:" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            # the help already says it, or there is nothing to show: an optional value, or a flag (a flag's default
            # is its absence; the stored value of --no-cache is True, which would read as "on by default")
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text + " " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action):
        # argparse prints no help line at all for an option without help text, so its default would not show:
        # give such an option an empty help, which _get_help_string turns into "(default: ...)"
        if not action.help and action.option_strings and self._get_help_string(action):
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr (``prog: error: ...; see --help``)
    and exit status 2, instead of the whole usage block followed by the error; ``--help`` shows every
    default (:class:`HelpFormatter`).

    Options must be spelled out: ``allow_abbrev=False``, so ``--epoch 3`` is refused instead of being taken as
    ``--epochs`` (an abbreviation silently changes meaning the day another option shares its prefix)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def exit_on_sigterm(main):
    """Decorate a CLI ``main`` so that SIGTERM (``kill``, a job scheduler, ``timeout``) ends it like Ctrl-C would:
    a one-line message, ``SystemExit(143)`` raised in the main thread, so every ``finally`` runs and a staging
    report folder is removed instead of being left beside ``--output``. The previous handler is restored after."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)

        def stop(signum, frame):
            sys.stderr.write("stopped by SIGTERM; no report was written\n")
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            return main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def one_line(text) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return _io.one_line(text)


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """Turn the library's errors about the user's input -- :class:`~bagcert.checkpoint.CheckpointError`,
    :class:`~bagcert.data.DatasetError`, :class:`~bagcert.report.ReportFolderError`, the ImageNet-Patch
    ``PatchFileError`` and the ``ValueError`` / ``TypeError`` of argument checks -- raised inside the block
    into ``SystemExit("<prefix><message>")``: one line on stderr and exit status 1, no traceback. Wrap only
    the steps that read and check the user's input, never the computation."""
    from ..checkpoint import CheckpointError

    try:
        yield
    except (CheckpointError, ValueError, TypeError) as e:  # DatasetError, ReportFolderError, PatchFileError are ValueErrors
        raise SystemExit(one_line(f"{prefix}{e}")) from None


@contextlib.contextmanager
def run_errors():
    """Turn a library run's refusal of its input (:mod:`bagcert.runs`) raised inside the block into ``SystemExit``
    with one line (exit status 1, no traceback): a config field's :class:`~bagcert.runs._checks.FieldError` spelled
    with its option (``--roa-box must be an odd integer >= 1, got 2``), any other
    :class:`~bagcert.runs._checks.RunInputError` or :class:`~bagcert.report.ReportFolderError` as its message.
    Anything else raised by the run is a failure inside the computation, a bug: it keeps its traceback."""
    from ..report import ReportFolderError

    try:
        yield
    except _checks.FieldError as e:
        raise SystemExit(e.option_message()) from None
    except (_checks.RunInputError, ReportFolderError) as e:
        raise SystemExit(one_line(e)) from None


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """``cls(**fields)`` for a run config dataclass: each field from the parsed ``args`` attribute of the same
    name, ``output`` None when ``--output`` was left at its default (the run's default folder, replaced by each
    run), ``overrides`` last. Refusals as :func:`run_errors`."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if "output" in values and output_is_default(args):
        values["output"] = None
    values.update(overrides)
    with run_errors():
        return cls(**values)


def run_report(run, config, quiet: bool = False) -> int:
    """Run a report tool's library run (``run(config)``, an :class:`~bagcert.runs._io.AnalysisReport`) with its
    refusals as :func:`run_errors`, print summary.md and the folder written (unless ``quiet``), then the one-line JSON
    summary; returns the exit status 0."""
    with run_errors():
        report = run(config)
    if not quiet:
        print(report.markdown)
        print(written_message(report.output))
    print(json_line(report.summary))
    return 0


def add_model_module_argument(p, note: str = "") -> None:
    """``--model-module FILE_OR_MODULE`` (repeatable, ``args.model_modules``): a .py file or dotted module that
    registers models of the user's own (:func:`bagcert.models.load_model_module`; docs/own_model_plugin.md)."""
    p.add_argument("--model-module", dest="model_modules", action="append", metavar="FILE_OR_MODULE",
                   help="import this .py file or dotted module first, so that its bagcert.register_model(...) calls "
                   f"take effect: a model of your own (repeatable{'; ' + note if note else ''}; docs/own_model_plugin.md)")


def import_model_modules(modules) -> None:
    """Import the ``--model-module`` files / modules (None: none given; :func:`bagcert.runs._io.import_model_modules`);
    one line (``SystemExit``) naming the first that cannot be imported: not found, or the exception its code raised,
    with its file and line."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise SystemExit(f"model_modules must be a list of .py files or dotted module names, got {modules!r}")
    with user_errors():
        _io.import_model_modules(modules)


def _argparse_type(check, text):
    """``check(text)`` (a value-only rule of :mod:`bagcert.runs._checks`) with its ``ValueError`` as argparse's
    ``ArgumentTypeError``, so that argparse prints ``argument --flag: <message>``."""
    try:
        return check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device(text) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... -> the same text, checked (argparse ``type=``): an unknown device
    type or an accelerator this machine does not have is refused (:func:`bagcert.runs._checks.device`)."""
    return _argparse_type(_checks.device, text)


def positive_int(text) -> int:
    """``"4"`` -> 4; zero, negative or non-integer text is refused (argparse ``type=``)."""
    return _argparse_type(_checks.positive_int, text)


def nonnegative_int(text) -> int:
    """``"0"`` -> 0; negative or non-integer text is refused (argparse ``type=``), for counts where 0 means none."""
    return _argparse_type(_checks.nonnegative_int, text)


def bounded_number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                   what: str | None = None):
    """An argparse ``type=`` reading a finite number like :func:`parse_number` (``0.03``, ``8/255``) and refusing
    one outside ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end excluded; None: unbounded), with one line
    naming the range (``must be a number > 0, got -1``; ``what`` replaces "a number > 0" when given;
    :func:`bagcert.runs._checks.number_in_range`)."""

    def parse(text) -> float:
        return _argparse_type(functools.partial(_checks.number_in_range, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open,
                                                what=what), text)

    parse.__name__ = "number"  # parse_list and argparse name the kind by it
    return parse


#: ``"0.01"`` -> 0.01; zero or negative is refused (learning rates, step sizes, decay factors).
positive_number = bounded_number(0, lo_open=True)
#: ``"0"`` -> 0.0; negative is refused.
nonnegative_number = bounded_number(0)
#: a value in [0, 1]: a pixel value or an L-inf budget in the images' [0, 1] pixel units (accepts ``8/255``).
unit_number = bounded_number(0, 1, what="a number in [0, 1] (pixel units)")


def workers(text) -> int:
    """``"4"`` -> 4 loader processes (argparse ``type=``): an integer >= 0 and at most
    :func:`bagcert.streaming.max_loader_workers` (usable CPU cores and available memory, shared by the torchrun
    processes on this machine); more is refused with one line instead of ending in the OOM killer."""
    return _argparse_type(_checks.workers, text)


def check_workers_apply(workers_given: int | None, requested: str, chosen: str, flag: str = "--workers") -> None:
    """``--workers`` read the images of the stream path only (:func:`bagcert.runs._io.check_workers_apply`): given with
    ``--data-path memory`` it is ``SystemExit`` with one line; with ``--data-path auto`` that chose the memory path,
    stderr says it is unused."""
    with user_errors():
        _io.check_workers_apply(workers_given, requested, chosen, flag)


def check_output_outside_dataset(output, dataset, flag: str = "--output") -> None:
    """Refuse (``SystemExit``, one line) an output folder that is the dataset folder or lies inside it
    (:func:`bagcert.runs._io.check_output_outside_dataset`)."""
    with user_errors():
        _io.check_output_outside_dataset(output, dataset, flag)


class _ExplicitOutput(argparse.Action):
    """``--output PATH``: stores the path and records that the user gave it (see :func:`output_is_default`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, "output_given", True)


def add_output_arguments(p, output: str) -> None:
    """``--output`` (default ``output``) and ``--overwrite``, the same in every report tool. A folder left at
    its default is replaced by the next run (said on stderr); a folder given with ``--output`` that holds
    another run's report needs ``--overwrite`` (:func:`prepare_output`)."""
    p.add_argument("--output", default=output, action=_ExplicitOutput,
                   help="report folder, new or empty (a report already there needs --overwrite); left at its default, "
                   "the previous report there is replaced")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report already in --output (all of its files) instead of refusing")
    p.set_defaults(output_given=False)


def output_is_default(args: argparse.Namespace) -> bool:
    """Whether ``--output`` was left at its default (not given on the command line)."""
    return not getattr(args, "output_given", True)


def add_run_arguments(p: argparse.ArgumentParser, output: str) -> None:
    """``--seed``, ``--threads``, ``--output`` (default ``output``), ``--overwrite`` and ``--quiet``: the same in
    every report tool."""
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset and of any random draw")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    add_output_arguments(p, output)
    p.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    add_cache_argument(p)


def add_cache_argument(p: argparse.ArgumentParser) -> None:
    """``--no-cache``: decode the dataset afresh and neither read nor write the decode cache
    (``$BAGCERT_CACHE``, default ``~/.cache/bagcert``; docs/guarantees.md "Dataset cache")."""
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="decode the images afresh; neither read nor write the decode cache ($BAGCERT_CACHE, default ~/.cache/bagcert)")


def prepare_output(path, overwrite: bool = False, default_folder: bool = False, dataset=None):
    """Check, before any work, that the report folder ``path`` can be written, and return its
    :class:`~bagcert.report.ReportFolder` (:func:`bagcert.runs._io.prepare_output`; ``default_folder``: see there,
    for a tool's ``args`` it is :func:`output_is_default`). A folder that cannot take the report is ``SystemExit``
    with one line."""
    with user_errors():
        return _io.prepare_output(path, overwrite, default_folder, dataset)


show_path = _io.show_path


def written_message(folder) -> str:
    """``report written to <folder>/ (<every file in it>)`` for a committed report folder (path as :func:`show_path`)."""
    folder = Path(folder)
    names = sorted(f.name for f in folder.iterdir() if not f.name.startswith(".")) if folder.is_dir() else []
    return f"report written to {show_path(folder)}/ ({', '.join(names)})"


progress_bar = _io.progress_bar


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (torch's own choice when it is not given; :func:`bagcert.runs._io.apply_threads`)."""
    _io.apply_threads(args)


def parse_number(text) -> float:
    """``"0.03"``, ``"8/255"`` -> float (argparse ``type=``)."""
    return _argparse_type(_checks.parse_number, text)


def parse_list(text: str, kind=int, name: str = "list") -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except (ValueError, argparse.ArgumentTypeError):
        raise SystemExit(f"--{name}: cannot read {text!r} as a comma-separated list of {kind.__name__} values") from None


def subset(data, num: int | None, seed: int, flag: str = "the number of images", default: int | None = None):
    """:func:`bagcert.runs._io.subset`; a refusal is ``SystemExit`` with its one line."""
    with user_errors():
        return _io.subset(data, num, seed, flag, default)


def checkpoint_input_size(meta: dict, path, default: int = 32) -> int:
    """:func:`bagcert.runs._io.checkpoint_input_size`; malformed metadata is ``SystemExit`` with one line."""
    with user_errors():
        return _io.checkpoint_input_size(meta, path, default)


def load_model_and_data(checkpoint: str, dataset: str, split: str, seed: int, num: int | None, flag: str = "the number of images",
                        default: int | None = None, cache: bool = True):
    """``(model, meta, data)`` (:func:`bagcert.runs._io.load_model_and_data`); a bad checkpoint or dataset is
    ``SystemExit`` with one line."""
    with user_errors():
        return _io.load_model_and_data(checkpoint, dataset, split, seed, num, flag, default, cache)


dataset_info = _io.dataset_info


json_line = _io.json_line


def commit_report(folder) -> Path:
    """Move ``folder``'s staged report into place (:func:`bagcert.runs._io.commit_report`); a folder taken
    meanwhile is ``SystemExit`` with one line saying where this run's report was left."""
    with user_errors():
        return _io.commit_report(folder)


def write_report(output, tool: str, config: dict, results: dict, markdown: str, device: str = "cpu", overwrite: bool | None = None,
                 extra=None) -> dict:
    """Write ``results.json`` (environment, tool, run id, config, results) and ``summary.md``.

    ``output`` is either a :class:`~bagcert.report.ReportFolder` (from :func:`prepare_output`): the files go
    into its staging folder and the caller writes the rest there and commits it; or a path: the report is
    staged and moved into place here as one set, with ``extra(folder)`` (optional) writing further files
    (figures) into the same staging folder first. ``overwrite`` (path only; default ``config["overwrite"]``):
    replace a report already there. A folder that cannot take the report is ``SystemExit`` with one line."""
    from ..report import ReportFolder

    folder = output if isinstance(output, ReportFolder) else None
    if folder is None:
        folder = prepare_output(output, bool(config.get("overwrite", False)) if overwrite is None else overwrite,
                                default_folder=config.get("output_given") is False)
    out = folder.stage()
    doc = _io.write_report_files(folder, tool, config, results, markdown, device)
    if not isinstance(output, ReportFolder):
        try:
            if extra is not None:
                extra(out)
            commit_report(folder)
        finally:
            folder.discard()
    return doc


plt_or_none = _io.plt_or_none


save_figure = _io.save_figure


pct = _io.pct
