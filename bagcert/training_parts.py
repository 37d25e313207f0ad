"""The parts of the training loop of :mod:`bagcert.training`, each with its own state and tests.

``bagcert.training.train`` reads as a loop over these parts (in the style of torchvision's reference
scripts): :class:`RunState` (where the run is and where it ends), :class:`Checkpointer` (``last.pt``: resume
checks, atomic saves), :class:`TimeBudget` (calibration, plan and re-plans of a wall-clock budget, on top
of the pure functions :func:`plan_total_steps` and :func:`replan_total_steps`), :class:`TrainLog`
(``train_log.jsonl`` and TensorBoard, cut back on resume), :class:`StatWindow` (means of the training
statistics between log records), :class:`Evaluator` (held-out clean and certified accuracy), and the
training data as batches of a step: :class:`MemoryBatches` (the uint8 tensor in memory, whole-batch
augmentation) or :class:`StreamBatches` (:mod:`bagcert.streaming` loaders with worker processes).

Every name here is also importable from :mod:`bagcert.training`.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .certification import certify_logits
from .checkpoint import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from .data import Dataset, augment_batch

__all__ = [
    "TrainingError", "RunState", "Checkpointer", "TimeBudget", "TrainLog", "StatWindow", "Evaluator", "MemoryBatches",
    "StreamBatches", "evaluate", "calibration_window", "plan_total_steps", "projected_seconds", "replan_total_steps",
    "window_seconds_per_step", "REPLAN_WINDOW", "RUN_FILES", "remove_stale_temporaries", "cut_log", "log_ends_done",
    "StopSignals", "base_lr",
]


class TrainingError(ValueError):
    """A run that cannot start or continue as configured: a resume whose arguments differ from the run's, an
    output folder that cannot be written or already holds another run, a time budget too small for its
    calibration, data fewer than one batch. ``train.py`` prints the message as one line and exits non-zero."""


def _progress(step: int, total: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
    """Fraction of the decay phase done at ``step``: 0 at the end of the warm-up, 1 at ``total``.

    ``anchor = (step_a, t_a)`` comes from a re-planned time-budgeted run: its progress was ``t_a`` at
    ``step_a`` under the old total, and from there it runs linearly to 1 at the new ``total``, so the
    learning rate stays continuous when the total changes.
    """
    if anchor is not None and step >= anchor[0]:
        step_a, t_a = anchor
        return t_a + (1.0 - t_a) * (step - step_a) / max(1, total - step_a)
    return (step - warmup) / max(1, total - warmup)


def _lr_at(cfg, step: int, total: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
    """The learning rate of ``step``: linear warm-up to :func:`base_lr`, then the schedule's decay to ``total``."""
    lr = base_lr(cfg)
    if cfg.schedule == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    t = _progress(step, total, warmup, anchor)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "onecycle":
        return lr * max(0.0, 1 - t)
    raise ValueError(f"schedule must be cosine, onecycle or constant, got {cfg.schedule!r}")


def calibration_window(warmup: int) -> tuple[int, int]:
    """Steps (start, end) whose wall time a time-budgeted run measures before planning its length.

    The window skips the first 5 steps (allocation, first-call overheads) and ends inside the learning-rate
    warm-up where possible (at most 105 steps), so that no step before the plan depends on the planned total.
    """
    return 5, max(25, min(warmup, 105))


def plan_total_steps(step: int, elapsed_s: float, budget_s: float, step_s: float, eval_s: float, eval_every_steps: int) -> int:
    """Total number of steps that fits a wall-clock budget.

    After ``step`` steps and ``elapsed_s`` seconds, each further step costs ``step_s`` seconds and an
    evaluation of ``eval_s`` seconds follows every ``eval_every_steps`` steps (plus one at the end), so
    ``r`` more steps cost ``r * step_s + (r / eval_every_steps + 1) * eval_s``. Returns ``step + r`` for the
    largest such ``r`` within the budget (at least ``step``: a spent budget ends the run now).
    """
    if not budget_s > 0:
        raise ValueError(f"time budget must be > 0 seconds, got {budget_s}")
    if not step_s > 0 or eval_s < 0 or eval_every_steps < 1:
        raise ValueError(f"need step_s > 0, eval_s >= 0 and eval_every_steps >= 1, got {step_s}, {eval_s}, {eval_every_steps}")
    left = budget_s - elapsed_s - eval_s
    per_step = step_s + eval_s / eval_every_steps
    return step + max(0, math.floor(left / per_step))


def projected_seconds(step: int, total_steps: int, elapsed_s: float, step_s: float, eval_s: float, eval_every_steps: int) -> float:
    """Wall seconds at which a run at ``step`` after ``elapsed_s`` seconds ends ``total_steps``, at the given speed."""
    remaining = max(0, total_steps - step)
    return elapsed_s + remaining * step_s + (remaining / eval_every_steps + 1) * eval_s


def replan_total_steps(
    step: int, total_steps: int, elapsed_s: float, budget_s: float, step_s: float, eval_s: float, eval_every_steps: int,
    tolerance: float = 0.01,
) -> int:
    """A budgeted run's total after an evaluation, from the speed of the steps since the previous one.

    The speed measured at the start of a run need not hold to its end (another job starts on the machine,
    the CPU clocks down). If the remaining ``total_steps - step`` steps at ``step_s`` seconds each, with their
    evaluations of ``eval_s`` seconds, would end more than ``tolerance * budget_s`` away from the budget, the
    total is planned again with :func:`plan_total_steps`; otherwise it is kept.
    """
    projected = projected_seconds(step, total_steps, elapsed_s, step_s, eval_s, eval_every_steps)
    if abs(projected - budget_s) <= tolerance * budget_s:
        return total_steps
    return plan_total_steps(step, elapsed_s, budget_s, step_s, eval_s, eval_every_steps)


REPLAN_WINDOW = 3  # evaluation intervals whose steps together give the speed a re-plan uses


def window_seconds_per_step(intervals: list[tuple[int, float]], window: int = REPLAN_WINDOW) -> float:
    """Seconds per step over the last ``window`` intervals between evaluations, each ``(steps, seconds)``.

    The speed of one interval alone is noisy (checkpoint writes, the machine's clock, other processes): on a run
    alone on the machine it varied by 20 % between intervals, and the 1 % tolerance of
    :func:`replan_total_steps` then re-planned at most evaluations. The steps of the last few intervals together
    vary less, and a lasting change of speed (a neighbour job) is fully seen after ``window`` intervals.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 interval, got {window}")
    recent = intervals[-window:]
    steps = sum(n for n, _ in recent)
    if not recent or steps < 1:
        raise ValueError(f"need at least one interval with steps, got {intervals!r}")
    return sum(t for _, t in recent) / steps


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock readings cover it (the loop itself never syncs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seeded(*parts) -> torch.Generator:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return torch.Generator().manual_seed(s)


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


def _from_rank0(values: list, world: int) -> list:
    """Rank 0's float ``values`` on every rank (decisions every rank must take alike)."""
    if world > 1:
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, 0)
        values = t.tolist()
    return values


def _checkpoint_and_stop(checkpoint_due: bool, stop: StopSignals, world: int) -> tuple:
    """(checkpoint now?, signal number or 0), the same on every rank: one all_reduce (max) of rank 0's checkpoint
    clock (other ranks pass False) and of each rank's received signal."""
    flags = torch.tensor([int(bool(checkpoint_due)), int(stop.signum or 0)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1])


@torch.no_grad()
def evaluate(model, data, patch_sizes, batch_size: int = 500, device="cpu", amp: bool = False, rank: int = 0, world: int = 1,
             workers: int = 0) -> dict:
    """Clean and certified accuracy on ``data``: ``{"n", "clean_accuracy", "certified_<p>" per patch size}``.

    ``data``: an in-memory :class:`~bagcert.data.Dataset` or a :mod:`bagcert.streaming` dataset (its evaluation
    view, read by ``workers`` loader processes); the same images give the same numbers either way. Under DDP each
    rank certifies a share and the counts are summed (every rank returns the totals).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(2 + len(patch_sizes), dtype=torch.float64)
    for xb, yb in _eval_batches(data, batch_size, rank, world, workers):
        x = xb.to(device).float().div_(255.0)
        y = yb.to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            z = model.local_logits(x)
        res = certify_logits(z.float(), y, model.geometry, tuple(x.shape[-2:]), patch_sizes=list(patch_sizes))
        first = next(iter(res.values()))
        counts[0] += len(y)
        counts[1] += first.correct.sum().item()
        for k, r in enumerate(res.values()):
            counts[2 + k] += (r.certified & r.correct).sum().item()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    out = {"n": int(counts[0]), "clean_accuracy": float(counts[1] / counts[0])}
    for k, p in enumerate(patch_sizes):
        out[f"certified_{p}"] = float(counts[2 + k] / counts[0])
    return out


def _vote_figure(model, x, y, classes):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with torch.no_grad():
        z = model.local_logits(x[:1].float())[0]
    votes = (z > 0).float()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    axes[0].imshow(x[0].permute(1, 2, 0).float().cpu().numpy())
    axes[0].set_title(f"label: {classes[int(y[0])]}")
    axes[1].imshow(votes[int(y[0])].cpu().numpy(), vmin=0, vmax=1)
    axes[1].set_title("votes for the label")
    counts = votes.sum(dim=(1, 2)).cpu().numpy()
    axes[2].bar(range(len(counts)), counts)
    axes[2].set_title("vote counts")
    for a in axes[:2]:
        a.axis("off")
    fig.tight_layout()
    return fig


@torch.no_grad()
def _evaluate_peer(model, data, peer, seed: int, batch_size: int = 500, device="cpu", rank: int = 0, world: int = 1) -> dict:
    """Accuracy of a peer classifier on the peer's transform of ``data`` (the same seeded draws at every
    evaluation and for any number of processes); PatchCleanser also: on the unmasked images. The
    certificates themselves (W or M(M+1)/2 passes per image) are left to the certifier after training."""
    was_training = model.training
    model.eval()
    n = len(data)
    counts = torch.zeros(3, dtype=torch.float64)
    for c, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        rows = torch.arange(rank, size, world)
        if len(rows) == 0:
            continue
        b = start + rows
        x = _float_images(data, b).to(device)
        y = data.labels[b].to(device)
        xt = peer.transform(x, _seeded(seed, 101, c), rows=rows, global_size=size)
        counts[0] += len(b)
        counts[1] += (model(xt).argmax(dim=1) == y).sum().item()
        if peer.method == "patchcleanser":
            counts[2] += (model(x).argmax(dim=1) == y).sum().item()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    key = "ablated_accuracy" if peer.method == "drs" else "masked_accuracy"
    out = {"n": int(counts[0]), key: float(counts[1] / max(counts[0], 1))}
    if peer.method == "patchcleanser":
        out["clean_accuracy"] = float(counts[2] / max(counts[0], 1))
    return out


def base_lr(cfg) -> float:
    """The peak learning rate of ``cfg`` (a :class:`~bagcert.training.TrainConfig`): ``cfg.lr``, or with
    ``cfg.lr_scale_batch = N`` the linear scaling rule ``cfg.lr * cfg.batch_size * cfg.grad_accum / N``.
    ``batch_size`` is already the global batch over all processes, so ``batch_size * grad_accum`` is what one
    optimiser step sees."""
    if getattr(cfg, "lr_scale_batch", None) is None:
        return cfg.lr
    return cfg.lr * cfg.batch_size * cfg.grad_accum / cfg.lr_scale_batch


def _float_images(data, index) -> torch.Tensor:
    """float [k, 3, H, W] in [0, 1] of items ``index`` of an in-memory Dataset or a bagcert.streaming dataset."""
    if isinstance(data, Dataset):
        return data.float_images(index)
    return torch.stack([data[int(i)][0] for i in index]).float().div_(255.0)


def _eval_batches(data, batch_size: int, rank: int, world: int, workers: int = 0):
    """This rank's evaluation batches ``(uint8 images, int64 labels)``: every ``world``-th image from ``rank`` on
    (in-memory), or the rank's share of each global batch of a streaming loader; together the ranks see every
    image exactly once."""
    if isinstance(data, Dataset):
        idx = torch.arange(rank, len(data), world)
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            yield data.images[b], data.labels[b]
        return
    from .streaming import make_loader

    for x, y, _ in make_loader(data, batch_size * world, train=False, rank=rank, world=world, workers=workers, pin_memory=False):
        yield x, y


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


class TimeBudget:
    """A wall-clock budget for the whole run: measure, plan the number of steps, re-plan after evaluations.

    The speed is measured over the calibration window (:func:`calibration_window`; a run resumed inside it
    measures steps ``step + 5`` to ``step + 25``), then :meth:`plan` sets ``run.total_steps`` with
    :func:`plan_total_steps`; after each evaluation :meth:`evaluated` re-plans from the speed of the last
    intervals (:func:`window_seconds_per_step`, :func:`replan_total_steps`). Rank 0 decides every number.
    ``elapsed()`` gives the run's wall seconds so far (earlier invocations included), ``on_total(run)`` is
    called after each change of the total (config.json, progress bar); plans are logged to ``log``.
    """

    def __init__(self, minutes: float, run: RunState, eval_every_steps: int, log: TrainLog, elapsed, on_total=None,
                 world: int = 1, clock=time.perf_counter, sync=lambda: None):
        self.minutes, self.budget_s = minutes, 60.0 * minutes
        self.eval_every_steps, self.log, self.elapsed = eval_every_steps, log, elapsed
        self.on_total = on_total or (lambda run: None)
        self.world, self.clock, self.sync = world, clock, sync
        self.cal_start, self.cal_end = calibration_window(run.warmup)
        if not run.planned:
            if run.step >= self.cal_start:  # resumed inside the window of a run that had not planned yet
                self.cal_start, self.cal_end = run.step + 5, run.step + 25
            run.min_end = self.cal_end  # the provisional length must reach the end of the window
        self.t_cal = None
        self.intervals = []  # (steps, training seconds) of the intervals between evaluations since the plan
        self.seg_t0, self.seg_step0 = clock(), run.step

    def calibration_done(self, run: RunState) -> bool:
        """Call after every step: True once, after the last step of the calibration window (then :meth:`plan`)."""
        if run.planned:
            return False
        if run.step == self.cal_start:
            self.sync()  # queued GPU work belongs to the steps before the window
            self.t_cal = self.clock()
        return run.step == self.cal_end

    def plan(self, run: RunState, eval_seconds) -> None:
        """Plan the total from the calibration window's speed and ``eval_seconds()`` (one full evaluation).

        Raises :class:`TrainingError` (after a ``time_budget_refused`` log record) when the budget cannot hold
        the window and one evaluation."""
        self.sync()
        step_s = (self.clock() - self.t_cal) / (self.cal_end - self.cal_start)
        eval_s = float(eval_seconds())
        elapsed = self.elapsed()
        self._refuse_below(run, elapsed + eval_s, elapsed, eval_s)
        total = int(_from_rank0([plan_total_steps(run.step, elapsed, self.budget_s, step_s, eval_s, self.eval_every_steps)], self.world)[0])
        self._set_total(run, total, "time_budget_plan", f"{step_s:.3f} s/step over steps {self.cal_start}-{self.cal_end}",
                        step_s, eval_s, elapsed)
        self.seg_t0, self.seg_step0 = self.clock(), run.step

    def evaluated(self, run: RunState, t_eval0: float) -> None:
        """After an evaluation that began at ``t_eval0`` (this clock): close the interval and re-plan if needed."""
        if not (run.planned and self.seg_step0 < run.step < run.end):
            return
        self.sync()
        self.intervals.append((run.step - self.seg_step0, t_eval0 - self.seg_t0))
        self._replan(run, window_seconds_per_step(self.intervals), self.clock() - t_eval0)
        self.seg_t0, self.seg_step0 = self.clock(), run.step

    def _replan(self, run: RunState, step_s: float, eval_s: float) -> None:
        elapsed = self.elapsed()
        args = (run.step, run.total_steps, elapsed, self.budget_s, step_s, eval_s, self.eval_every_steps)
        total = int(_from_rank0([replan_total_steps(*args)], self.world)[0])
        if total == run.total_steps:
            return
        before = run.total_steps
        if run.step > run.warmup:  # keep the learning rate continuous across the change
            run.anchor = (run.step, _progress(run.step, run.total_steps, run.warmup, run.anchor))
        over = f"the last {min(len(self.intervals), REPLAN_WINDOW)} evaluation interval(s)"
        self._set_total(run, total, "time_budget_replan", f"{step_s:.3f} s/step over {over}", step_s, eval_s, elapsed,
                        previous_total_steps=before, projected_seconds_before=projected_seconds(*args[:3], *args[4:]))

    def _set_total(self, run, total, key, speed, step_s, eval_s, elapsed, **extra) -> None:
        before = run.total_steps
        run.set_total(total)
        epochs = total / run.steps_per_epoch
        self.on_total(run)
        if self.log.is_main:
            what = "planned" if key == "time_budget_plan" else f"re-planned from {before} to"
            self.log.say(
                f"time budget {self.minutes:g} min at step {run.step}: {speed}, {eval_s:.1f} s per evaluation, "
                f"{elapsed:.0f} s spent; {what} {total} steps ({epochs:.2f} epochs, written to config.json)"
            )
            self.log.append({"step": run.step, key: {
                "budget_seconds": self.budget_s, "seconds_per_step": step_s, "seconds_per_eval": eval_s,
                "elapsed_seconds": elapsed, "total_steps": total, "epochs": epochs, **extra}})

    def _refuse_below(self, run, minimum_s, elapsed, eval_s) -> None:
        """A budget that cannot hold the calibration window and one evaluation: refused (rank 0 decides)."""
        minimum_s = _from_rank0([minimum_s], self.world)[0]
        if self.budget_s >= minimum_s:
            return
        minutes = math.ceil(minimum_s / 60 * 100) / 100
        self.log.append({"step": run.step, "time_budget_refused": {
            "budget_seconds": self.budget_s, "minimum_seconds": minimum_s, "elapsed_seconds": elapsed, "seconds_per_eval": eval_s}})
        raise TrainingError(
            f"time budget {self.minutes:g} min is too small: the calibration window (steps {self.cal_start}-{self.cal_end}) "
            f"ended after {elapsed:.1f} s here and one evaluation takes {eval_s:.1f} s, so no budget below {minutes:.2f} min "
            f"can train past the calibration; give --time-budget-minutes {minutes:.2f} or more (refused at step {run.step}; "
            f"no plan, no model written)"
        )


class Evaluator:
    """Held-out evaluation during training: clean and certified accuracy at ``patch_sizes`` (:func:`evaluate`),
    or a peer classifier's accuracy on its transform (``peer``); ``data`` is an in-memory Dataset or a
    bagcert.streaming dataset (read with ``workers`` loader processes). Under DDP each rank evaluates a share
    and the counts are summed, so every rank gets the numbers of one process."""

    def __init__(self, data, patch_sizes, device, rank: int = 0, world: int = 1, peer=None, seed: int = 0, workers: int = 0,
                 amp: bool = False):
        self.data, self.patch_sizes, self.device = data, list(patch_sizes), device
        self.rank, self.world, self.peer, self.seed, self.workers = rank, world, peer, seed, workers
        self.amp = amp  # bf16 autocast of the evaluation's forward passes (not for a peer)

    def __call__(self, model, data=None) -> dict:
        data = self.data if data is None else data
        if self.peer is None:
            return evaluate(model, data, self.patch_sizes, device=self.device, amp=self.amp, rank=self.rank, world=self.world,
                            workers=self.workers)
        return _evaluate_peer(model, data, self.peer, self.seed, device=self.device, rank=self.rank, world=self.world)

    def probe_seconds(self, model, images: int = 200, clock=time.perf_counter) -> float:
        """Seconds one full evaluation takes, from timing the first ``images`` images (scaled to the set)."""
        probe = self.data.subset(torch.arange(min(len(self.data), images)))
        t0 = clock()
        self(model, probe)
        return (clock() - t0) * len(self.data) / len(probe)

    def vote_figure(self, model):
        """A matplotlib figure of the first image's votes (None for a peer or without matplotlib)."""
        if self.peer is not None:
            return None
        return _vote_figure(model, _float_images(self.data, torch.arange(1)), self.data.labels[:1], self.data.classes)


def stream_augmentation(cfg) -> str:
    """The :mod:`bagcert.streaming` ``augment`` that carries ``cfg``'s augmentation on the stream path:
    ``"resized-crop"`` for ``random_crop`` (torchvision's RandomResizedCrop and a flip), ``"pad-crop"`` for a flip
    and zero padding 4 (the in-memory CIFAR augmentation), ``"none"`` for neither; ``cutout`` is applied per batch.
    Raises :class:`TrainingError` for a combination only the in-memory path has."""
    if cfg.random_crop and cfg.flip:
        return "resized-crop"
    if not cfg.random_crop and cfg.flip and cfg.pad == 4:
        return "pad-crop"
    if not cfg.random_crop and not cfg.flip and cfg.pad == 0:
        return "none"
    raise TrainingError(
        f"the stream data path augments with a flip and zero padding 4, with RandomResizedCrop and a flip (random_crop), "
        f"or not at all (flip false, pad 0); flip {cfg.flip}, pad {cfg.pad}, random_crop {cfg.random_crop} exists only on "
        f"the in-memory path: use --data-path memory, or --pad 4"
    )


class MemoryBatches:
    """The training batches of each step from a uint8 :class:`~bagcert.data.Dataset` in memory (the fast path).

    Epoch ``e``'s order is ``randperm(n)`` seeded by ``(seed, e)``; step ``k`` of the epoch takes the
    ``batch_size * grad_accum`` images at positions ``k * that`` onwards, and micro-batch ``j`` of it the
    rows ``j * batch_size + rank, ..., (j + 1) * batch_size`` by ``world``. Augmentation (:func:`augment_batch`:
    flip, pad-and-crop, cutout, random crop) and a peer's transform are drawn for the whole step batch from
    generators seeded by ``(seed, e, k)``, so each image gets the same draw with any number of processes or
    micro-batches. Micro-batches are float [b, 3, S, S] in [0, 1] on ``device`` with int64 labels [b].
    """

    path = "memory"

    def __init__(self, data: Dataset, cfg, rank: int = 0, world: int = 1, device="cpu", peer=None):
        self.data, self.cfg, self.rank, self.world, self.device, self.peer = data, cfg, rank, world, torch.device(device), peer
        self.n = len(data) if cfg.train_limit is None else min(cfg.train_limit, len(data))
        self.step_batch = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = self.n // self.step_batch
        self._perm = (None, None)  # (epoch, its order): drawn once per epoch, not at every step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """``randperm(n)`` seeded by ``(seed, epoch)``: the order of the training images in ``epoch``."""
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=_seeded(self.cfg.seed, epoch)))
        return self._perm[1]

    def micro_batches(self, step: int):
        cfg, B = self.cfg, self.cfg.batch_size
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.epoch_order(epoch)
        gidx = perm[k * self.step_batch : (k + 1) * self.step_batch]
        for j in range(cfg.grad_accum):
            rows = torch.arange(j * B + self.rank, (j + 1) * B, self.world)
            idx = gidx[rows]
            y = self.data.labels[idx].to(self.device)
            xb = augment_batch(
                self.data.images[idx], _seeded(cfg.seed, epoch, k, 7), flip=cfg.flip, pad=cfg.pad, cutout=cfg.cutout,
                rows=rows, global_size=len(gidx), crop=cfg.image_size if cfg.random_crop else None,
            )
            yield _finish(_to_float(xb, self.device, cfg.channels_last), cfg, self.peer, (epoch, k), rows, len(gidx)), y

    def close(self) -> None:
        pass


def _to_float(xb: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """uint8 [b, 3, S, S] -> float32 in [0, 1] on ``device``, channels_last when asked: one conversion copy into
    the final layout (the same values as ``.float().div_(255)`` followed by a channels_last copy)."""
    xb = xb.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(xb.shape, dtype=torch.float32, device=xb.device, memory_format=fmt).copy_(xb).div_(255.0)


def _finish(x, cfg, peer, at, rows, global_size):
    """A peer's transform (drawn for the global batch, seeded by (seed, epoch, k)) and channels_last."""
    if peer is not None:
        x = peer.transform(x, _seeded(cfg.seed, *at, 11), rows=rows, global_size=global_size)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class StreamBatches:
    """The training batches of each step from a :mod:`bagcert.streaming` dataset, decoded by ``workers``
    DataLoader processes (persistent, pinned memory on CUDA).

    The loader (:func:`bagcert.streaming.make_loader`, ``drop_last``) yields this rank's share of global
    batches of ``batch_size``; step ``k`` of epoch ``e`` takes the loader's batches ``k * grad_accum`` onwards,
    in the same epoch order as :class:`MemoryBatches` (``randperm`` seeded by ``(seed, e)``). Each image is
    augmented by the dataset's own per-sample augmentation seeded by ``(seed, e, index)``, cutout is drawn per
    step batch. The loader starts (or restarts after a resume) at the step's batch of its epoch, so a resumed
    run gets the batches of an uninterrupted one.
    """

    path = "stream"

    def __init__(self, data, cfg, rank: int = 0, world: int = 1, device="cpu", peer=None, workers: int = 0):
        from .streaming import make_loader

        if cfg.train_limit is not None and cfg.train_limit < len(data):
            data = data.subset(torch.arange(cfg.train_limit))
        self.data, self.cfg, self.rank, self.world, self.device, self.peer = data, cfg, rank, world, torch.device(device), peer
        self.n = len(data)
        self.step_batch = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = (self.n // cfg.batch_size) // cfg.grad_accum
        self.loader = None
        if self.steps_per_epoch >= 1:
            self.loader = make_loader(data, cfg.batch_size, train=True, seed=cfg.seed, rank=rank, world=world, workers=workers,
                                      pin_memory=self.device.type == "cuda", drop_last=True)
        self._it, self._next = None, None

    def micro_batches(self, step: int):
        cfg, B = self.cfg, self.cfg.batch_size
        epoch, k = divmod(step, self.steps_per_epoch)
        first = k * cfg.grad_accum
        if self._next != (epoch, first):
            self.loader.batch_sampler.set_epoch(epoch, first)
            self._it = iter(self.loader)
        for j in range(cfg.grad_accum):
            x, y, _ = next(self._it)
            self._next = (epoch, first + j + 1)
            rows = torch.arange(j * B + self.rank, (j + 1) * B, self.world)
            x = x.to(self.device, non_blocking=True)
            if cfg.cutout > 0:
                x = augment_batch(x, _seeded(cfg.seed, epoch, k, 7), flip=False, pad=0, cutout=cfg.cutout, rows=rows,
                                  global_size=self.step_batch)
            yield (_finish(_to_float(x, self.device, cfg.channels_last), cfg, self.peer, (epoch, k), rows, self.step_batch),
                   y.to(self.device, non_blocking=True))

    def close(self) -> None:
        self._it, self.loader = None, None
