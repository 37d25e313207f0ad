"""Where a run stands and what it keeps on disk: :class:`RunState` (steps done, the schedule's length, where this
invocation ends), :class:`Checkpointer` (``last.pt``, written atomically), :class:`StopSignals` (SIGINT / SIGTERM
become a stop after the current step), the output folder (:func:`check_output_folder`,
:func:`remove_stale_temporaries`, ``config.json``) and resuming (:func:`resume_config_changes` with
:data:`RESUME_REFUSED` / :data:`RESUME_ALLOWED`).

A checkpoint only needs the weights, the optimiser state, the EMA weights and the step counter: the data order and
the augmentation are seeded by (seed, epoch, step) and the learning rate is a function of the step, so a resumed
run continues bit-for-bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from .config import TrainConfig
from .errors import TrainingError

__all__ = ["RunState", "Checkpointer", "StopSignals", "RUN_FILES", "remove_stale_temporaries", "check_output_folder",
           "RESUME_REFUSED", "RESUME_ALLOWED", "resume_config_changes"]


@dataclass
class RunState:
    """Where a run stands, in optimiser steps.

    ``step``: steps done; ``total_steps``: the length of the schedule (the learning rate reaches its end there);
    ``max_steps``: this invocation stops there (None: at the total); ``warmup``: learning-rate warm-up steps;
    ``wall_before``: seconds the run spent in earlier invocations; ``planned``: False while a time-budgeted run
    has not measured its speed; ``anchor``: ``(step, progress)`` of the last re-plan (see ``_progress``);
    ``min_end``: a provisional end the calibration window of an unplanned run needs.
    """

    steps_per_epoch: int
    total_steps: int
    warmup: int = 0
    step: int = 0
    max_steps: int | None = None
    wall_before: float = 0.0
    planned: bool = True
    anchor: tuple | None = None
    min_end: int = 0

    @property
    def end(self) -> int:
        """The step this invocation stops after: the total (or the calibration window's end), cut at max_steps."""
        total = max(self.total_steps, self.min_end)
        return total if self.max_steps is None else min(total, self.max_steps)

    @property
    def epoch(self) -> float:
        """Epochs done, fractional."""
        return self.step / self.steps_per_epoch

    def position(self) -> tuple:
        """``(epoch, k)``: the step about to run is batch ``k`` of epoch ``epoch``."""
        return divmod(self.step, self.steps_per_epoch)

    def set_total(self, total: int) -> None:
        """A (re-)planned schedule length; the run is planned from now on."""
        self.total_steps, self.min_end, self.planned = int(total), 0, True


class Checkpointer:
    """``<out>/last.pt``: the state a run needs to continue exactly, written atomically by rank 0.

    It holds ``model``, ``optimizer``, ``ema`` (when used), ``step``, ``wall_seconds``, ``config`` (the
    TrainConfig as a dict), ``planned_total_steps`` and ``schedule_anchor`` (time-budgeted runs) and ``data``
    (the training data record). :meth:`due` says when ``every_minutes`` have passed since the last save.
    """

    REQUIRED = ("model", "optimizer", "step", "config")

    def __init__(self, out, is_main: bool = True, every_minutes: float = 5.0, clock=time.perf_counter):
        self.path = Path(out) / "last.pt"
        self.is_main, self.every_s, self.clock = is_main, 60.0 * every_minutes, clock
        self._last = clock()

    def load(self, resume: bool, compare) -> tuple:
        """``(state or None, changes)`` for a run about to start: None without a ``last.pt``; with one, ``resume``
        must be set and ``compare(state["config"])`` returns the allowed changes (it raises for refused ones).

        Raises :class:`TrainingError` for a ``last.pt`` without ``resume`` (nothing is overwritten) and
        :class:`~bagcert.checkpoint.CheckpointError` for a file that is not a training checkpoint.
        """
        if not self.path.is_file():
            return None, {}
        if not resume:
            raise TrainingError(
                f"{self.path.parent} already holds a run ({self.path.name}); continue it with --resume (resume=True) or "
                f"train into another output folder (nothing was overwritten)"
            )
        state = safe_torch_load(self.path, "training checkpoint")
        if not isinstance(state, dict) or not set(self.REQUIRED) <= set(state):
            raise CheckpointError(f"{self.path} is not a bagcert training checkpoint (needs model, optimizer, step and config)")
        return state, compare(state["config"])

    def due(self) -> bool:
        """Whether ``every_minutes`` have passed since the last save (always False on ranks other than 0)."""
        return self.is_main and self.clock() - self._last > self.every_s

    def save(self, run: RunState, config: dict, model, optimizer, ema, data_record: dict, wall_seconds: float,
             budgeted: bool) -> None:
        """Write ``last.pt`` (rank 0 only) and restart the clock of :meth:`due`."""
        if self.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": run.step,
                "wall_seconds": wall_seconds,
                "config": config,
                "planned_total_steps": run.total_steps if budgeted and run.planned else None,
                "schedule_anchor": list(run.anchor) if run.anchor is not None else None,
                "data": data_record,
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_torch_save(state, self.path)
        self._last = self.clock()


class StopSignals:
    """SIGINT and SIGTERM become a request to stop after the current step, for the duration of a ``with`` block.

    ``signum`` is the first signal received (None before). Later signals change nothing: under ``torchrun`` a
    Ctrl-C reaches every worker and the agent then sends its own SIGTERM, and both must end in the same graceful
    stop (SIGKILL stops at once, losing the work since the last checkpoint). The handlers are installed only in
    the main thread (Python allows no other); the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        return False


# atomic_torch_save / atomic_write_text write ``.<name>.<random>.tmp`` next to ``<name>`` (tempfile.mkstemp); these are
# the names a run writes into its output folder
RUN_FILES = ("last.pt", "config.json", "train_log.jsonl", "model.pt", "peer_classifier.pt")


_RUN_TEMPORARY = re.compile(r"\.(?:%s)\.[A-Za-z0-9_]+\.tmp" % "|".join(re.escape(n) for n in RUN_FILES))


def remove_stale_temporaries(out) -> list:
    """Delete the temporary files an interrupted atomic write of a run file (:data:`RUN_FILES`) left in ``out``.

    Only plain files named like the toolkit's own temporaries (``.last.pt.k3j_x9a2.tmp``) are removed; returns
    their names, sorted. Called at the start of a run, when no write of this run is in progress.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for p in sorted(out.iterdir()):
        if _RUN_TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p.name)
    return removed


def check_output_folder(path) -> Path:
    """Refuse an output folder that cannot be created or written, before any work is done; creates nothing.

    Raises :class:`TrainingError` when ``path`` is a file, lies under a file, or its nearest existing folder is
    not writable by this process. Returns ``Path(path)``.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {out} is a file; expected a folder (existing or to be created)")
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingError(f"output {out} lies under the file {probe}; expected a path where a folder can be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingError(f"output {out}: the folder {probe} is not writable by this process")
    return out


# --resume compares the arguments with the config stored in last.pt. Every TrainConfig field is in exactly one of
# these two sets (tested). Refused: anything that defines the run's trajectory (data and its split, augmentation,
# model, optimiser and schedule, loss, numerics, seed), because the steps already taken were made with the stored
# values and the continuation would be another run. Allowed, and recorded in the log: where the run ends, how it is
# evaluated, logged and checkpointed, where and with how many threads it runs.
RESUME_REFUSED = frozenset({
    "dataset", "image_size", "resize", "num_classes", "train_limit", "flip", "pad", "cutout", "random_crop", "split_seed",
    "test_fraction", "model", "model_kwargs", "peer", "batch_size", "optimizer", "lr", "weight_decay", "momentum",
    "schedule", "warmup_epochs", "ema", "init_from", "loss", "patch_sizes", "tau", "kappa", "margin_weight",
    "margin_warmup_epochs", "bce_weight", "bce_pos_weight", "margin_reduce", "ce_weight", "label_smoothing", "amp", "seed",
    "grad_accum", "lr_scale_batch", "sync_bn", "masking_evidence", "masking_clip", "masking_pairs", "masking_scale",
})


RESUME_ALLOWED = frozenset({
    "epochs", "time_budget_minutes", "max_steps", "eval_images", "eval_every", "eval_patch_sizes", "checkpoint_minutes",
    "log_every", "threads", "device", "compile", "channels_last", "output", "tensorboard", "progress", "workers",
    # how the same step is computed (compiled, fused kernels) and how evaluations are computed: rounding only
    "compile_step", "fused_optimizer", "eval_amp",
    # where the model's code is imported from (the model's name and arguments are refused above)
    "model_modules",
    # the resolved path (memory or stream) is what counts: it is stored in last.pt and a resume must use the same one
    "data_path",
})


def resume_config_changes(stored: dict, cfg: TrainConfig) -> dict:
    """Compare the config a run was checkpointed with (``last.pt``'s ``"config"``) with ``cfg``.

    Returns ``{key: [stored, new]}`` for the keys of :data:`RESUME_ALLOWED` that differ (a time-budgeted run's
    ``epochs`` is its plan, not an argument, and is not compared while both have a budget). Raises
    :class:`TrainingError` naming every key of :data:`RESUME_REFUSED` that differs, with both values. A key
    missing from ``stored`` (a checkpoint from an older bagcert) counts as its default.
    """
    if not isinstance(stored, dict):
        raise TrainingError(f"last.pt holds no config dict (got {type(stored).__name__}); it cannot be resumed")
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    new = json.loads(json.dumps(asdict(cfg)))
    old = {k: stored.get(k, defaults[k]) for k in new}
    if isinstance(old["resize"], int) and isinstance(old["image_size"], int) and old["resize"] < old["image_size"]:
        old["resize"] = None  # stored before TrainConfig.check refused it: no loader applied it (see export_checkpoint)
    differ = [k for k in sorted(new) if old[k] != new[k]]
    if old["time_budget_minutes"] is not None and new["time_budget_minutes"] is not None and "epochs" in differ:
        differ.remove("epochs")
    refused = [k for k in differ if k not in RESUME_ALLOWED]
    if refused:
        what = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in refused)
        raise TrainingError(
            f"--resume would continue the run in {cfg.output} with other settings ({what}); the steps already taken "
            f"used the stored ones, so this is another run: resume with the stored values (--config {Path(cfg.output) / 'config.json'}) "
            f"or train into another --output"
        )
    return {k: [old[k], new[k]] for k in differ}


def _write_config(out: Path, cfg: TrainConfig) -> None:
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
