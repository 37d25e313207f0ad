"""A run's log: :class:`TrainLog` (``train_log.jsonl``, one JSON object per line, and optional TensorBoard),
:class:`StatWindow` (means of the training statistics between log records), and the log file on resume
(:func:`cut_log`, :func:`log_ends_done`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from .state import remove_stale_temporaries

__all__ = ["TrainLog", "StatWindow", "cut_log", "log_ends_done"]


class TrainLog:
    """``<out>/train_log.jsonl`` (one JSON object per line) and, optionally, TensorBoard under ``<out>/tb``.

    Only rank 0 writes; on other ranks every method does nothing. :meth:`start` prepares the folder for a run
    that starts or resumes at a step: stale temporaries of interrupted writes are removed and the log is cut
    back to that step (:func:`cut_log`), each said through ``say``.
    """

    def __init__(self, out, is_main: bool = True, tensorboard: bool = False, say=print):
        self.out = Path(out)
        self.path = self.out / "train_log.jsonl"
        self.is_main, self.say = is_main, say
        self.tensorboard = tensorboard and is_main
        self.writer = None

    def start(self, step: int, resumed: bool) -> None:
        """Create the folder, remove stale temporaries, cut the log back to ``step`` (rank 0)."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(self.out)
        if removed:
            self.say(f"removed {len(removed)} temporary file(s) an interrupted write left in {self.out}: {', '.join(removed)}")
        dropped = cut_log(self.path, step)
        if dropped:
            self.say(f"{self.path.name}: dropped {dropped} record(s) written after step {step}, where this run "
                     f"{'resumes' if resumed else 'starts'}")

    def open_tensorboard(self) -> None:
        """Open the TensorBoard writer (rank 0, when asked). TensorBoard is an optional extra: when it is not
        installed, one line on stderr says so and how to get it, and training goes on without TensorBoard logs
        (``train_log.jsonl`` holds the same numbers)."""
        if self.tensorboard and self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tensorboard = False
                print("tensorboard logging skipped: tensorboard is not installed (pip install 'bagcert[tensorboard]'); "
                      "train_log.jsonl holds the same numbers", file=sys.stderr, flush=True)
                return
            self.writer = SummaryWriter(str(self.out / "tb"))

    def append(self, rec: dict) -> None:
        """One JSON line (rank 0)."""
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """TensorBoard scalars ``<prefix>/<key>`` of the numbers in ``values`` (``step`` itself is skipped)."""
        if self.writer is not None:
            for key, v in values.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", v, step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None and fig is not None:
            self.writer.add_figure(tag, fig, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StatWindow:
    """The training statistics since the last log record: per-key sums kept on the device (one host transfer
    per record, not one per step) and the images seen, for ``images_per_s``."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.sums, self.counts, self.images, self.t0 = {}, {}, 0, self.clock()

    def add(self, stats: dict, images: int) -> None:
        """One step's statistics (0-d tensors) and the number of images it trained on (all processes)."""
        for key, v in stats.items():
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
            self.counts[key] = self.counts.get(key, 0) + 1
        self.images += images

    def flush(self) -> tuple:
        """``(means, images_per_s)`` since the last flush: each key's mean over the steps that had it."""
        dt = self.clock() - self.t0
        ips = self.images / max(dt, 1e-9)
        keys = list(self.sums)
        means = torch.stack([self.sums[k].float() for k in keys]).tolist() if keys else []
        out = {k: m / self.counts[k] for k, m in zip(keys, means)}
        self._reset()
        return out, ips


def _log_lines(path: Path):
    """(complete lines, partial last line) of a JSON-lines file; a kill during a write can leave the last line partial."""
    text = path.read_text()
    lines = text.split("\n")
    return lines[:-1], lines[-1]


def cut_log(path, step: int) -> int:
    """Cut a run's ``train_log.jsonl`` back to ``step`` (the step a run resumes from; 0 for a fresh start).

    Records written after that step (their ``"step"`` is larger), ``done`` records (the run goes on) and a partial
    last line are dropped; lines that are not JSON objects are kept as they are. The file is rewritten atomically,
    and only when something is dropped. Returns the number of lines dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines, partial = _log_lines(path)
    keep, dropped = [], int(partial != "")
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and ("done" in rec or isinstance(rec.get("step"), (int, float)) and rec["step"] > step):
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


def log_ends_done(path, step: int) -> bool:
    """Whether a run's log ends with the ``done`` record of a run that ended at ``step`` (written after model.pt)."""
    path = Path(path)
    if not path.is_file():
        return False
    lines, partial = _log_lines(path)
    if partial or not lines:
        return False
    try:
        rec = json.loads(lines[-1])
    except json.JSONDecodeError:
        return False
    return isinstance(rec, dict) and rec.get("done") is True and rec.get("steps") == step
