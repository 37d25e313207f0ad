"""Certified training loop (no argparse here: ``train.py`` is the CLI).

Determinism and resumption: the data order of epoch e is ``randperm`` from a generator seeded with
(seed, e), and the augmentation of step k from one seeded with (seed, e, k); the learning rate is a
pure function of the global step. A checkpoint therefore only needs the weights, the optimiser
state, the EMA weights and the step counter, and ``resume`` continues bit-for-bit: the final weights
equal those of an uninterrupted run with the same seed (tested).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP (gloo on CPU,
nccl on CUDA) and each rank takes every WORLD_SIZE-th sample of the global batch; the global batch
size stays the configured one. Only rank 0 writes files.

Peer base classifiers (``cfg.peer``, e.g. ``"drs-column:4"`` or ``"patchcleanser:5"``; see
:mod:`bagcert.peers.spec`): the model is the peer's :class:`~bagcert.peers.PooledClassifier`, the loss
cross-entropy on its logits, and every augmented batch goes through the peer's training transform
(random ablation / random masks), seeded by (seed, e, k) and drawn for the global batch like the
augmentation. The result is ``<output>/peer_classifier.pt`` (``bagcert.peers.load_peer_certifier``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import __version__
from .certification import certify_logits
from .checkpoint import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load, save_checkpoint
from .data import Dataset, augment_batch
from .losses import BagCertLoss
from .models import create_model

__all__ = [
    "TrainConfig", "TrainingError", "train", "evaluate", "distributed_env", "export_checkpoint", "dataset_metadata",
    "leave_process_group", "resume_config_changes", "RESUME_ALLOWED", "RESUME_REFUSED", "check_output_folder",
    "remove_stale_temporaries", "cut_log", "log_ends_done", "StopSignals",
]


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"
    image_size: int = 32
    resize: int | None = None
    num_classes: int = 10
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    eval_images: int = 1000
    flip: bool = True
    pad: int = 4
    cutout: int = 0
    random_crop: bool = False  # train images stored at resize x resize, random image_size crops (ImageNet-style)
    split_seed: int = 0  # seeded train/test split for datasets without one
    test_fraction: float = 0.2
    # model
    model: str = "cifar_bagnet9_s2"
    model_kwargs: dict = field(default_factory=dict)
    peer: str | None = None  # train a peer's base classifier: "drs-column:4", "drs-block:12", "patchcleanser:5[,k=6,masks=2]"
    # optimisation
    epochs: float = 10.0
    # wall-clock budget in minutes for the whole run: the number of steps is planned from the speed measured
    # during the first steps (see plan_total_steps) and replaces ``epochs``; the plan is written to config.json
    # and kept by --resume
    time_budget_minutes: float | None = None
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    ema: float = 0.0  # decay per step (warmed up, see ema_decay); 0 disables
    init_from: str | None = None  # start from this model checkpoint's weights (same model and kwargs) instead of random
    # loss
    loss: str = "bagcert"  # bagcert | ce
    patch_sizes: list = field(default_factory=lambda: [5])
    tau: float = 2.0
    kappa: float = 0.25
    margin_weight: float = 5.0
    margin_warmup_epochs: float = 1.0
    bce_weight: float = 1.0
    bce_pos_weight: float = 1.0
    margin_reduce: str = "min"  # min (the certificate's worst window) | mean (hinge averaged over windows)
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    # system
    amp: bool = False
    channels_last: bool = True
    compile: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    eval_every: float = 1.0  # epochs
    eval_patch_sizes: list = field(default_factory=lambda: [1, 3, 5])
    checkpoint_minutes: float = 5.0
    log_every: int = 20
    output: str = "runs/train"
    tensorboard: bool = True
    progress: bool = True
    max_steps: int | None = None  # stop after this many global steps (tests, benchmarks)

    def check(self) -> "TrainConfig":
        """Refuse numbers no run can use, each with what was expected (from flags or a config file alike).

        Without it, ``batch_size 0`` or ``log_every 0`` ended in a ZeroDivisionError, a negative ``epochs`` or
        ``lr`` trained nothing or uphill, and ``eval_every 0`` was quietly taken as every step.
        """
        def number(name, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            is_int = type(v) is int
            ok = is_int if integer else (is_int or type(v) is float) and math.isfinite(v)
            if ok and lo is not None:
                ok = v > lo if lo_open else v >= lo
            if ok and hi is not None:
                ok = v < hi if hi_open else v <= hi
            if not ok:
                kind = "an int" if integer else "a finite number"
                bounds = " and ".join(
                    f"{op} {b:g}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi)) if b is not None)
                raise ValueError(f"{name} must be {kind}{' ' + bounds if bounds else ''}{' (or None)' if optional else ''}, got {v!r}")

        for name in ("image_size", "batch_size", "log_every"):
            number(name, lo=1, integer=True)
        number("num_classes", lo=2, integer=True)
        for name in ("resize", "train_limit"):
            number(name, lo=1, integer=True, optional=True)
        number("max_steps", lo=0, integer=True, optional=True)
        for name in ("eval_images", "pad", "cutout"):  # eval_images 0: every held-out image
            number(name, lo=0, integer=True)
        number("test_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        for name in ("epochs", "lr", "tau", "bce_pos_weight", "eval_every"):
            number(name, lo=0, lo_open=True)
        number("time_budget_minutes", lo=0, lo_open=True, optional=True)
        for name in ("weight_decay", "warmup_epochs", "margin_weight", "margin_warmup_epochs", "bce_weight", "ce_weight",
                     "checkpoint_minutes"):
            number(name, lo=0)
        number("kappa")
        for name in ("momentum", "ema", "label_smoothing"):
            number(name, lo=0, hi=1, hi_open=True)
        for name, allowed in (("optimizer", ("adamw", "adam", "sgd")), ("schedule", ("cosine", "onecycle", "constant")),
                              ("loss", ("bagcert", "ce")), ("margin_reduce", ("min", "mean"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        from .models import list_models

        if self.model not in list_models():
            raise ValueError(f"model must be a registered model name, got {self.model!r}; available: {', '.join(list_models())}")
        return self


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


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


def _lr_at(cfg: TrainConfig, step: int, total: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = _progress(step, total, warmup, anchor)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "onecycle":
        return cfg.lr * max(0.0, 1 - t)
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


def _make_optimizer(cfg: TrainConfig, model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")


@torch.no_grad()
def evaluate(model, data: Dataset, patch_sizes, batch_size: int = 500, device="cpu", amp: bool = False, rank: int = 0, world: int = 1) -> dict:
    """Clean and certified accuracy on ``data``; under DDP each rank certifies a shard and counts are summed."""
    was_training = model.training
    model.eval()
    n = len(data)
    idx = torch.arange(rank, n, world)
    counts = torch.zeros(2 + len(patch_sizes), dtype=torch.float64)
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        x = data.float_images(b).to(device)
        y = data.labels[b].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            z = model.local_logits(x)
        res = certify_logits(z.float(), y, model.geometry, tuple(x.shape[-2:]), patch_sizes=list(patch_sizes))
        first = next(iter(res.values()))
        counts[0] += len(b)
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


class TrainingError(ValueError):
    """A run that cannot start or continue as configured: a resume whose arguments differ from the run's, an
    output folder that cannot be written or already holds another run, a time budget too small for its
    calibration, data fewer than one batch. ``train.py`` prints the message as one line and exits non-zero."""


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
})
RESUME_ALLOWED = frozenset({
    "epochs", "time_budget_minutes", "max_steps", "eval_images", "eval_every", "eval_patch_sizes", "checkpoint_minutes",
    "log_every", "threads", "device", "compile", "channels_last", "output", "tensorboard", "progress",
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


def _stopped_summary(summary: dict, signum: int, step: int, wall: float, out: Path, append_log, pbar, writer) -> dict:
    """End a run stopped by a signal after ``step`` (last.pt is written): a ``stopped`` log record, the summary
    with the signal's name and the conventional exit status 128 + signum."""
    name = signal.Signals(signum).name
    append_log({"step": step, "stopped": name, "wall_seconds": wall})
    if pbar is not None:
        pbar.close()
    if writer is not None:
        writer.close()
    summary.update({"steps": step, "wall_seconds": wall, "output": str(out), "stopped": name, "exit_status": 128 + signum})
    return summary


def _data_record(train_data: Dataset, steps_per_epoch: int) -> dict:
    """What a checkpoint records about its training data: ``dataset`` (name), ``classes``, the seeded ``split``
    and ``imagenet_indices`` where they apply (:func:`dataset_metadata`), and ``steps_per_epoch``. Stored in last.pt
    so that :func:`export_checkpoint` writes the same metadata keys as the model.pt at the end of training."""
    return {"dataset": train_data.name, "classes": list(train_data.classes), "steps_per_epoch": steps_per_epoch,
            **dataset_metadata(train_data)}


def _data_metadata(record: dict) -> dict:
    """The checkpoint metadata keys of a :func:`_data_record`."""
    return {k: v for k, v in record.items() if k != "steps_per_epoch"}


def _resume_state(cfg: TrainConfig, ckpt_path: Path, resume: bool):
    """(last.pt's state or None, allowed config changes) for a run about to start; refuses what cannot continue."""
    if not ckpt_path.is_file():
        return None, {}
    if not resume:
        raise TrainingError(
            f"{ckpt_path.parent} already holds a run ({ckpt_path.name}); continue it with --resume (resume=True) or "
            f"train into another output folder (nothing was overwritten)"
        )
    state = safe_torch_load(ckpt_path, "training checkpoint")
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= set(state):
        raise CheckpointError(f"{ckpt_path} is not a bagcert training checkpoint (needs model, optimizer, step and config)")
    return state, resume_config_changes(state["config"], cfg)


def train(cfg: TrainConfig, train_data: Dataset, eval_data: Dataset | None = None, resume: bool = False, log=print) -> dict:
    """Train a model with ``cfg``; returns a summary dict (``steps``, ``wall_seconds``, ``output``, ``eval``).

    Writes into ``cfg.output``: ``config.json``, ``train_log.jsonl`` (JSON lines), ``last.pt`` (every
    ``checkpoint_minutes`` and at the end) and ``model.pt`` (``peer_classifier.pt`` for a peer) at the end.

    Stop: SIGINT or SIGTERM during the call finishes the current step, writes ``last.pt`` and a ``stopped`` log
    record, and returns with ``summary["stopped"]`` (the signal's name) and ``summary["exit_status"]``
    (128 + signal number); no model.pt is written. Under torch.distributed every rank stops after the same step.
    The previous signal handlers are restored on return.

    Resume (``resume=True`` with a ``last.pt``): the arguments are compared with the stored config before anything
    is written (:func:`resume_config_changes`); the log is cut back to the checkpoint's step (:func:`cut_log`) and
    a ``resumed`` record lists the allowed changes. A finished run (its log ends with the ``done`` record of the
    checkpoint's step and no later end is asked for) is left byte-identical: ``summary["already_finished"]``.

    Raises :class:`TrainingError` (a ValueError) for a run that cannot start or continue as configured, ValueError
    from :meth:`TrainConfig.check`, :class:`~bagcert.checkpoint.CheckpointError` for an unreadable ``last.pt``.
    """
    with StopSignals() as stop:
        return _train_run(cfg, train_data, eval_data, resume, log, stop)


def _train_run(cfg: TrainConfig, train_data: Dataset, eval_data: Dataset | None, resume: bool, log, stop: StopSignals) -> dict:
    cfg.check()
    rank, world, local_rank = distributed_env()
    device = torch.device(cfg.device if cfg.device != "cuda" or world == 1 else f"cuda:{local_rank}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads is not None:
        if type(cfg.threads) is not int or cfg.threads < 1:
            raise TrainingError(f"threads must be a positive int (or None for torch's default), got {cfg.threads!r}")
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise TrainingError(f"batch size {cfg.batch_size} is not divisible by the number of processes {world}")
    peer = _peer_spec(cfg)  # None for a bagcert model; checks the spec before anything is written
    out = check_output_folder(cfg.output)
    is_main = rank == 0
    ckpt_path = out / "last.pt"
    log_path = out / "train_log.jsonl"

    n = len(train_data) if cfg.train_limit is None else min(cfg.train_limit, len(train_data))
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise TrainingError(f"{n} training images are fewer than one batch of {cfg.batch_size}")

    def run_length(total: int) -> int:
        """Steps this invocation runs: the schedule's total, cut at --max-steps."""
        return total if cfg.max_steps is None else min(total, cfg.max_steps)

    budget_s = None if cfg.time_budget_minutes is None else 60.0 * cfg.time_budget_minutes
    planned = budget_s is None  # a budgeted run replaces total_steps once it has measured its speed
    anchor = None  # (step, progress) where a re-plan changed the total (see _progress)
    step, wall_before = 0, 0.0
    state, changes = _resume_state(cfg, ckpt_path, resume)  # refuses before anything is written
    if state is not None:
        step = int(state["step"])
        wall_before = float(state.get("wall_seconds", 0.0))
        if budget_s is not None and state.get("planned_total_steps") is not None:
            planned = True
            cfg = replace(cfg, epochs=int(state["planned_total_steps"]) / steps_per_epoch)  # config.json keeps the plan
            if state.get("schedule_anchor") is not None:
                anchor = (int(state["schedule_anchor"][0]), float(state["schedule_anchor"][1]))
    total_steps = int(round(cfg.epochs * steps_per_epoch))
    if state is not None and budget_s is not None and state.get("planned_total_steps") is not None:
        total_steps = int(state["planned_total_steps"])
    total_steps_run = run_length(total_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    margin_warm = max(1, int(round(cfg.margin_warmup_epochs * steps_per_epoch)))
    cal_start, cal_end = calibration_window(warmup)

    if state is not None and step >= total_steps_run:
        finished = _from_rank0([1.0 if is_main and log_ends_done(log_path, step) else 0.0], world)[0]
        if finished:
            if is_main:
                unused = f"; the changed {', '.join(changes)} were not applied" if changes else ""
                log(f"{out} holds a finished run ({step} steps, model written, log done); nothing to do, nothing changed "
                    f"(a later end, --epochs or --max-steps, continues it){unused}")
            return {"steps": step, "wall_seconds": wall_before, "output": str(out), "already_finished": True}

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(out)
        if removed:
            log(f"removed {len(removed)} temporary file(s) an interrupted write left in {out}: {', '.join(removed)}")
        dropped = cut_log(log_path, step)
        if dropped:
            log(f"{log_path.name}: dropped {dropped} record(s) written after step {step}, where this run "
                f"{'resumes' if state is not None else 'starts'}")
        atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
        if state is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "resumed": {"wall_seconds": wall_before, "changed": changes}}) + "\n")

    torch.manual_seed(cfg.seed)  # model initialisation only; data randomness uses its own generators
    if peer is None:
        model = create_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_kwargs).to(device)
        model.check_inputs = False  # inputs come from our own uint8 pipeline
        init_info = _init_from_checkpoint(model, cfg.init_from) if cfg.init_from else None
    else:
        from .peers import init_peer_classifier

        model = peer.build_classifier(cfg.model, cfg.num_classes, **cfg.model_kwargs).to(device)
        model.backbone.check_inputs = False
        init_info = init_peer_classifier(model, cfg.init_from) if cfg.init_from else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(cfg, model)
    ema = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    loss_fn = None if peer is not None else BagCertLoss(
        model.geometry,
        (cfg.image_size, cfg.image_size),
        cfg.patch_sizes,
        tau=cfg.tau,
        kappa=cfg.kappa,
        margin_weight=cfg.margin_weight,
        bce_weight=cfg.bce_weight,
        ce_weight=cfg.ce_weight,
        label_smoothing=cfg.label_smoothing,
        bce_pos_weight=cfg.bce_pos_weight,
        margin_reduce=cfg.margin_reduce,
    )

    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if is_main:
            log(f"resumed from {ckpt_path} at step {step}/{total_steps}"
                + (f"; changed: {', '.join(f'{k} {o!r} -> {v!r}' for k, (o, v) in changes.items())}" if changes else ""))
    elif resume and is_main:
        log(f"no checkpoint at {ckpt_path}; starting from scratch")
    state = None  # the weights are loaded; save_state builds its own
    data_record = _data_record(train_data, steps_per_epoch)

    # forward = local_logits (a peer classifier: its logits), so DDP and torch.compile see the training output
    net = model if peer is not None else _LocalLogits(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(net) if cfg.compile else net

    writer = None
    if is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    def save_state(final=False):
        if not is_main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "wall_seconds": wall_before + (time.perf_counter() - t_start),
            "config": json.loads(json.dumps(asdict(cfg))),
            "planned_total_steps": total_steps if budget_s is not None and planned else None,
            "schedule_anchor": list(anchor) if anchor is not None else None,
            "data": data_record,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        atomic_torch_save(state, ckpt_path)

    def append_log(rec):
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    pbar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_steps_run, initial=step, unit="step", dynamic_ncols=True, mininterval=2.0)

    t_start = time.perf_counter()
    last_ckpt = time.perf_counter()
    seg_t0, seg_step0 = t_start, step  # start of the current interval between evaluations
    intervals = []  # (steps, training seconds) of the intervals since the plan, for re-planning a budgeted run
    t_window, n_window = time.perf_counter(), 0
    win_sum, win_n = {}, {}  # per-key sums (device tensors) and counts of the training stats since the last log record
    per_rank = cfg.batch_size // world
    summary = {}
    model.train()
    amp_ctx = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp)  # noqa: E731
    eval_every_steps = max(1, int(round(cfg.eval_every * steps_per_epoch)))
    if not planned:
        if step >= cal_start:  # resumed inside the window of a run that had not planned yet
            cal_start, cal_end = step + 5, step + 25
        total_steps_run = run_length(max(total_steps, cal_end))  # the provisional length must reach the end of the window
        t_cal = None

    def plan():
        """Measure this run's speed and replace total_steps by what fits the time budget (rank 0 decides)."""
        _sync(device)
        step_s = (time.perf_counter() - t_cal) / (cal_end - cal_start)
        eval_s = 0.0
        if eval_data is not None:
            probe = eval_data.subset(torch.arange(min(len(eval_data), 200)))
            t0 = time.perf_counter()
            evaluate(ema if ema is not None else model, probe, cfg.eval_patch_sizes, device=device, amp=False, rank=rank, world=world)
            eval_s = (time.perf_counter() - t0) * len(eval_data) / len(probe)
        elapsed = wall_before + time.perf_counter() - t_start
        refuse_budget_below(elapsed + eval_s, elapsed, eval_s)
        total = from_rank0(plan_total_steps(step, elapsed, budget_s, step_s, eval_s, eval_every_steps))
        set_total(total, "time_budget_plan", f"{step_s:.3f} s/step over steps {cal_start}-{cal_end}", step_s, eval_s, elapsed)

    def refuse_budget_below(minimum_s, elapsed, eval_s):
        """A budget that cannot hold the calibration window and one evaluation: refused (rank 0 decides)."""
        minimum_s = _from_rank0([minimum_s], world)[0]
        if budget_s >= minimum_s:
            return
        minutes = math.ceil(minimum_s / 60 * 100) / 100
        append_log({"step": step, "time_budget_refused": {
            "budget_seconds": budget_s, "minimum_seconds": minimum_s, "elapsed_seconds": elapsed, "seconds_per_eval": eval_s}})
        raise TrainingError(
            f"time budget {cfg.time_budget_minutes:g} min is too small: the calibration window (steps {cal_start}-{cal_end}) "
            f"ended after {elapsed:.1f} s here and one evaluation takes {eval_s:.1f} s, so no budget below {minutes:.2f} min "
            f"can train past the calibration; give --time-budget-minutes {minutes:.2f} or more (refused at step {step}; "
            f"no plan, no model written)"
        )

    def replan(step_s, eval_s):
        """After an evaluation: plan again from the speed since the previous one if the run would miss its budget."""
        nonlocal anchor
        elapsed = wall_before + time.perf_counter() - t_start
        total = from_rank0(replan_total_steps(step, total_steps, elapsed, budget_s, step_s, eval_s, eval_every_steps))
        if total == total_steps:
            return
        if step > warmup:  # keep the learning rate continuous across the change
            anchor = (step, _progress(step, total_steps, warmup, anchor))
        over = f"the last {min(len(intervals), REPLAN_WINDOW)} evaluation interval(s)"
        set_total(total, "time_budget_replan", f"{step_s:.3f} s/step over {over}", step_s, eval_s, elapsed,
                  previous_total_steps=total_steps,
                  projected_seconds_before=projected_seconds(step, total_steps, elapsed, step_s, eval_s, eval_every_steps))

    def from_rank0(total: int) -> int:
        """rank 0's number on every rank: all ranks must run the same number of steps."""
        if world > 1:
            t = torch.tensor([total])
            dist.broadcast(t, 0)
            total = int(t.item())
        return total

    def set_total(total, key, speed, step_s, eval_s, elapsed, **extra):
        nonlocal total_steps, total_steps_run, cfg
        before = total_steps
        total_steps = total
        total_steps_run = run_length(total_steps)
        cfg = replace(cfg, epochs=total_steps / steps_per_epoch)
        if is_main:
            atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
            what = "planned" if key == "time_budget_plan" else f"re-planned from {before} to"
            log(
                f"time budget {cfg.time_budget_minutes:g} min at step {step}: {speed}, "
                f"{eval_s:.1f} s per evaluation, {elapsed:.0f} s spent; {what} {total_steps} steps "
                f"({cfg.epochs:.2f} epochs, written to config.json)"
            )
            append_log({"step": step, key: {
                "budget_seconds": budget_s, "seconds_per_step": step_s, "seconds_per_eval": eval_s,
                "elapsed_seconds": elapsed, "total_steps": total_steps, "epochs": cfg.epochs, **extra}})
            if pbar is not None:
                pbar.total = total_steps_run
                pbar.refresh()

    stopped = 0
    while step < total_steps_run:
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=_seeded(cfg.seed, epoch))
        gidx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        idx = gidx[rank::world]
        xb = train_data.images[idx]
        yb = train_data.labels[idx].to(device)
        xb = augment_batch(
            xb, _seeded(cfg.seed, epoch, k, 7), flip=cfg.flip, pad=cfg.pad, cutout=cfg.cutout,
            rows=torch.arange(rank, len(gidx), world), global_size=len(gidx),
            crop=cfg.image_size if cfg.random_crop else None,
        )
        x = xb.to(device).float().div_(255.0)
        if peer is not None:  # ablation / masks, drawn for the global batch like the augmentation
            x = peer.transform(x, _seeded(cfg.seed, epoch, k, 11), rows=torch.arange(rank, len(gidx), world), global_size=len(gidx))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = _lr_at(cfg, step, total_steps, warmup, anchor)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp_ctx():
            z = fwd(x)
        if cfg.loss == "ce":
            logits = z.float() if peer is not None else z.float().mean(dim=(2, 3))
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            stats = {"loss": loss.detach()}
        else:
            mw = cfg.margin_weight * min(1.0, step / margin_warm)
            loss, stats = loss_fn(z, yb, margin_weight=mw)
            stats["robust_train"] = (stats.pop("margin") > 0).float().mean()
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; per-rank losses are means over per_rank samples
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, model, ema_decay(cfg.ema, step))
        step += 1
        n_window += per_rank * world
        # window sums stay on the device: one host transfer per log record, not one per step
        for key, v in stats.items():
            win_sum[key] = win_sum[key] + v if key in win_sum else v.clone()
            win_n[key] = win_n.get(key, 0) + 1
        if not planned:
            if step == cal_start:
                _sync(device)  # queued GPU work belongs to the steps before the window
                t_cal = time.perf_counter()
            elif step == cal_end:
                plan()
                planned = True
                seg_t0, seg_step0 = time.perf_counter(), step
        if pbar is not None:
            pbar.update(1)
        if step % cfg.log_every == 0 or step == total_steps_run:
            dt = time.perf_counter() - t_window
            ips = n_window / max(dt, 1e-9)
            t_window, n_window = time.perf_counter(), 0
            keys = list(win_sum)
            means = torch.stack([win_sum[key].float() for key in keys]).tolist() if keys else []
            stats = {key: m / win_n[key] for key, m in zip(keys, means)}
            win_sum, win_n = {}, {}
            rec = {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "images_per_s": ips, **stats}
            append_log(rec)
            if writer is not None:
                for key, v in rec.items():
                    if key not in ("step",):
                        writer.add_scalar(f"train/{key}", v, step)
            if pbar is not None:
                pbar.set_postfix(loss=f"{stats['loss']:.3f}", ips=f"{ips:.0f}", ep=f"{step / steps_per_epoch:.2f}")
        do_eval = eval_data is not None and (step % eval_every_steps == 0 or step == total_steps_run)
        if do_eval:
            _sync(device)
            t_eval0 = time.perf_counter()
            m_eval = ema if ema is not None else model
            if peer is None:
                ev = evaluate(m_eval, eval_data, cfg.eval_patch_sizes, device=device, amp=False, rank=rank, world=world)
            else:
                ev = _evaluate_peer(m_eval, eval_data, peer, cfg.seed, device=device, rank=rank, world=world)
            rec = {"step": step, "epoch": step / steps_per_epoch, "eval": ev, "wall_seconds": wall_before + time.perf_counter() - t_start}
            append_log(rec)
            summary["eval"] = ev
            if is_main:
                msg = " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k != "n")
                log(f"[eval] epoch {step / steps_per_epoch:.2f}: {msg}")
            if writer is not None:
                for key, v in ev.items():
                    writer.add_scalar(f"eval/{key}", v, step)
                fig = None if peer is not None else _vote_figure(m_eval, eval_data.float_images(torch.arange(1)), eval_data.labels[:1], eval_data.classes)
                if fig is not None:
                    writer.add_figure("eval/vote_map", fig, step)
            if budget_s is not None and planned and seg_step0 < step < total_steps_run:
                _sync(device)
                intervals.append((step - seg_step0, t_eval0 - seg_t0))
                replan(step_s=window_seconds_per_step(intervals), eval_s=time.perf_counter() - t_eval0)
                seg_t0, seg_step0 = time.perf_counter(), step
        # checkpoint and stop decisions must be identical on all ranks: rank 0's clock decides the checkpoint, a
        # signal on any rank stops every rank after this step (one all_reduce of both flags)
        due, signum = _checkpoint_and_stop(is_main and time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60, stop, world)
        if due or signum:
            save_state()
            last_ckpt = time.perf_counter()
        if signum:
            stopped = signum
            break
    if stopped:
        return _stopped_summary(summary, stopped, step, wall_before + time.perf_counter() - t_start, out, append_log, pbar, writer)
    save_state(final=True)
    if pbar is not None:
        pbar.close()
    wall = wall_before + time.perf_counter() - t_start
    final_model = ema if ema is not None else model
    if is_main:
        meta = {
            "config": json.loads(json.dumps(asdict(cfg))),
            **_data_metadata(data_record),
            "input_size": cfg.image_size,
            "trained_steps": step,
            "epochs": step / steps_per_epoch,
            "wall_seconds": wall,
            "bagcert_version": __version__,
            "torch_version": str(torch.__version__),
            "world_size": world,
            "eval": summary.get("eval"),
        }
        if cfg.resize is not None:
            meta["resize"] = cfg.resize
        if init_info is not None:
            meta["init_from"] = init_info
        final_model = final_model.to(memory_format=torch.contiguous_format)
        if peer is None:
            final_model.check_inputs = True
            save_checkpoint(out / "model.pt", final_model, **meta)
        else:
            from .peers import save_peer_classifier

            final_model.backbone.check_inputs = True
            summary["peer_classifier"] = str(save_peer_classifier(out / "peer_classifier.pt", final_model, peer=peer.to_dict(), **meta))
        append_log({"done": True, "steps": step, "wall_seconds": wall})
    if writer is not None:
        writer.close()
    summary.update({"steps": step, "wall_seconds": wall, "output": str(out)})
    return summary


def export_checkpoint(run_dir, path, use_ema: bool = True, **extra_metadata):
    """Write a model checkpoint from a run's ``last.pt`` (e.g. while the run is still going).

    The metadata carries the same data keys as the model.pt written at the end of training (``dataset``,
    ``classes``, and the seeded ``split`` and ``imagenet_indices`` where they apply, see :func:`dataset_metadata`),
    plus that it is an intermediate export and at which step. A ``last.pt`` written before bagcert stored that
    record needs ``dataset=`` and ``classes=`` (and ``split=`` for a folder without splits) in ``extra_metadata``;
    without them it raises :class:`~bagcert.checkpoint.CheckpointError`. Returns the written path.
    """
    run_dir = Path(run_dir)
    state = safe_torch_load(run_dir / "last.pt", "training checkpoint")
    cfg = TrainConfig(**state["config"])
    record = state.get("data")
    if record is None and not {"dataset", "classes"} <= set(extra_metadata):
        raise CheckpointError(
            f"{run_dir / 'last.pt'} carries no record of its training data (written by an older bagcert): pass "
            f"dataset=..., classes=[...] (and split={{...}} for a folder without splits) to export_checkpoint"
        )
    peer = _peer_spec(cfg)
    if peer is None:
        model = create_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_kwargs)
    else:  # a peer run: the export is a peer classifier (bagcert.peers.save_peer_classifier)
        model = peer.build_classifier(cfg.model, cfg.num_classes, **cfg.model_kwargs)
    key = "ema" if use_ema and "ema" in state else "model"
    model.load_state_dict(state[key])
    model.eval()
    meta = {
        "config": state["config"],
        **(_data_metadata(record) if record is not None else {}),
        "input_size": cfg.image_size,
        "trained_steps": int(state["step"]),
        "wall_seconds": float(state.get("wall_seconds", 0.0)),
        "weights": key,
        "intermediate_export": True,
        "bagcert_version": __version__,
        "torch_version": str(torch.__version__),
    }
    if record is not None:
        meta["epochs"] = int(state["step"]) / record["steps_per_epoch"]
    if cfg.resize is not None:
        meta["resize"] = cfg.resize
    meta.update(extra_metadata)
    if peer is not None:
        from .peers import save_peer_classifier

        return save_peer_classifier(path, model, peer=peer.to_dict(), **meta)
    return save_checkpoint(path, model, **meta)


def _peer_spec(cfg: TrainConfig):
    """The parsed ``cfg.peer`` (None without one); a bad spec, a loss other than CE or an image the spec
    does not fit raise ValueError."""
    if not cfg.peer:
        return None
    from .peers import PeerSpec

    spec = PeerSpec.parse(cfg.peer)
    if cfg.loss != "ce":
        raise ValueError(
            f"peer {cfg.peer!r}: a peer's base classifier is trained with cross-entropy on its logits; the loss "
            f"{cfg.loss!r} does not apply (set loss='ce'; train.py does so when --loss is not given)"
        )
    spec.check_image_size(cfg.image_size)
    return spec


@torch.no_grad()
def _evaluate_peer(model, data: Dataset, peer, seed: int, batch_size: int = 500, device="cpu", rank: int = 0, world: int = 1) -> dict:
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
        x = data.float_images(b).to(device)
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


def leave_process_group() -> None:
    """End a torch.distributed run: every rank leaves the process group together (a rank that exits early
    aborts gloo's peers). Does nothing outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _init_from_checkpoint(model, path) -> dict:
    """Load a model checkpoint's weights into ``model`` (a warm start, e.g. to continue a finished run with a
    new schedule). The architectures must match exactly. Returns what the metadata records about the source."""
    from .checkpoint import load_checkpoint

    src, src_meta = load_checkpoint(path)
    if src.config != model.config:
        raise TrainingError(
            f"--init-from {path}: its model {src.config['name']} {src.config['kwargs']} differs from the configured "
            f"{model.config['name']} {model.config['kwargs']}"
        )
    model.load_state_dict(src.state_dict())
    return {
        "path": str(path),
        "trained_steps": src_meta.get("trained_steps"),
        "epochs": src_meta.get("epochs"),
        "wall_seconds": src_meta.get("wall_seconds"),
    }


def ema_decay(decay: float, step: int) -> float:
    """EMA decay used after optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

    The warm-up keeps the average close to the model early in training (with a fixed 0.999, after 780
    steps 46 % of the average would still be the random initialisation, and evaluations during training
    would show it); from about ``9 / (1 - decay)`` steps on, the decay is ``decay``.
    """
    return min(float(decay), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for floating-point parameters and buffers; other
    buffers (e.g. BatchNorm's step counter) are copied."""
    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
        if pe.dtype.is_floating_point:
            pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        else:
            pe.copy_(pm)


def dataset_metadata(train_data) -> dict:
    """Checkpoint metadata from the training set: the seeded split (if one was made) and, for models
    whose classes are Imagenette wnids, the ImageNet-1k index of each label."""
    from .attacks.imagenet_patch_attack import imagenet_label_mapping

    meta = {}
    if isinstance(train_data.info.get("seeded_split"), dict):
        meta["split"] = dict(train_data.info["seeded_split"])
    applicable, indices, _ = imagenet_label_mapping({}, train_data.classes, len(train_data.classes))
    if applicable and indices is not None:
        meta["imagenet_indices"] = list(indices)
    return meta


class _LocalLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.local_logits(x)
