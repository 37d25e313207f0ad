"""Certified training loop (no argparse here: ``train.py`` is the CLI).

Determinism and resumption: the data order of epoch e is ``randperm`` from a generator seeded with
(seed, e), and the augmentation of step k from one seeded with (seed, e, k); the learning rate is a
pure function of the global step. A checkpoint therefore only needs the weights, the optimiser
state, the EMA weights and the step counter, and ``resume`` continues bit-for-bit: the final weights
equal those of an uninterrupted run with the same seed (tested).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP (gloo on CPU,
nccl on CUDA) and each rank takes every WORLD_SIZE-th sample of the global batch; the global batch
size stays the configured one. Only rank 0 writes files. ``grad_accum = K`` runs K micro-batches of
``batch_size`` per optimiser step (DDP's ``no_sync`` on all but the last): the step's images and
augmentation are those of one batch of ``K * batch_size``.

The loop (:func:`train`) is made of the parts in :mod:`bagcert.training_parts`: the training data as
batches of a step (:class:`MemoryBatches`, the uint8 tensor in memory; :class:`StreamBatches`,
:mod:`bagcert.streaming` loaders with worker processes, for sets that do not fit in memory),
:func:`train_step`, :class:`RunState`, :class:`Checkpointer`, :class:`TimeBudget`, :class:`TrainLog`,
:class:`StatWindow` and :class:`Evaluator`.

Peer base classifiers (``cfg.peer``, e.g. ``"drs-column:4"`` or ``"patchcleanser:5"``; see
:mod:`bagcert.peers.spec`): the model is the peer's :class:`~bagcert.peers.PooledClassifier`, the loss
cross-entropy on its logits, and every augmented batch goes through the peer's training transform
(random ablation / random masks), seeded by (seed, e, k) and drawn for the global batch like the
augmentation. The result is ``<output>/peer_classifier.pt`` (``bagcert.peers.load_peer_certifier``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import __version__
from .checkpoint import CheckpointError, atomic_write_text, safe_torch_load, save_checkpoint
from .data import Dataset
from .losses import BagCertLoss
from .models import create_model
from .training_parts import (  # noqa: F401  (re-exported: bagcert.training's public names)
    REPLAN_WINDOW, RUN_FILES, Checkpointer, Evaluator, MemoryBatches, RunState, StatWindow, StopSignals, StreamBatches,
    TimeBudget, TrainingError, TrainLog, _checkpoint_and_stop, _evaluate_peer, _from_rank0, _lr_at, _progress, _seeded,
    _sync, _vote_figure, base_lr, calibration_window, cut_log, evaluate, log_ends_done, plan_total_steps,
    projected_seconds, remove_stale_temporaries, replan_total_steps, stream_augmentation, window_seconds_per_step,
)

__all__ = [
    "TrainConfig", "TrainingError", "train", "evaluate", "distributed_env", "export_checkpoint", "dataset_metadata",
    "leave_process_group", "resume_config_changes", "RESUME_ALLOWED", "RESUME_REFUSED", "check_output_folder",
    "remove_stale_temporaries", "cut_log", "log_ends_done", "StopSignals", "train_step", "calibration_window",
    "plan_total_steps", "replan_total_steps", "window_seconds_per_step", "ema_decay", "ema_update", "base_lr",
    "stream_augmentation", "RunState", "Checkpointer", "TimeBudget", "TrainLog", "StatWindow", "Evaluator",
    "MemoryBatches", "StreamBatches", "DATA_PATHS", "check_run_inputs", "TrainingFailed",
]

DATA_PATHS = ("auto", "memory", "stream")


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
    # .py files or dotted modules imported before the model is built, so that their bagcert.register_model calls
    # take effect (--model-module; docs/own_model_plugin.md)
    model_modules: list = field(default_factory=list)
    peer: str | None = None  # train a peer's base classifier: "drs-column:4", "drs-block:12", "patchcleanser:5[,k=6,masks=2]"
    # optimisation
    epochs: float = 10.0
    # wall-clock budget in minutes for the whole run: the number of steps is planned from the speed measured
    # during the first steps (see plan_total_steps) and replaces ``epochs``; the plan is written to config.json
    # and kept by --resume
    time_budget_minutes: float | None = None
    batch_size: int = 128  # the global batch of one micro-step, summed over all processes
    grad_accum: int = 1  # micro-batches per optimiser step: each step sees batch_size * grad_accum images
    lr_scale_batch: int | None = None  # linear rule: the peak lr is lr * batch_size * grad_accum / lr_scale_batch
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    ema: float = 0.0  # decay per step (warmed up, see ema_decay); 0 disables
    init_from: str | None = None  # start from this model checkpoint's weights (same model and kwargs) instead of random
    # loss
    loss: str = "bagcert"  # bagcert | ce | masking (bagcert.losses_masking: certified training for double masking)
    masking_evidence: str = "logits"  # logits | votes; masking_clip: the logits' clip; masking_pairs: greedy | all
    masking_clip: float = 1.0
    masking_pairs: str = "greedy"
    masking_scale: float = 10.0  # CE temperature on the evidence normalised into [-1, 1]
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
    # under DDP, batch-norm layers normalise with the statistics of the global batch (torch.nn.SyncBatchNorm)
    # instead of each process's share of it; needs CUDA (see check_sync_bn and docs/training.md)
    sync_bn: bool = False
    # torch.compile of the forward pass and the loss together (one graph, its backward compiled with it); the
    # margin weight enters as a tensor so that its warm-up does not recompile (docs/training.md, "On a CPU")
    compile_step: bool = False
    # the optimiser's fused kernel (torch.optim AdamW/Adam fused=True; SGD has none): one kernel per parameter instead
    # of torch's per-parameter loop of small operations on CPU; rounding differs from the unfused update in the last bits
    fused_optimizer: bool = False
    eval_amp: bool = False  # bf16 autocast in the evaluations during training (their numbers move by rounding only)
    device: str = "cpu"
    data_path: str = "auto"  # auto | memory | stream: how train.py reads the training data (bagcert.streaming.choose_data_path)
    workers: int | None = None  # loader processes of the stream path (None: min(8, CPUs))
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

        for name in ("image_size", "batch_size", "log_every", "grad_accum"):
            number(name, lo=1, integer=True)
        number("lr_scale_batch", lo=1, integer=True, optional=True)
        number("workers", lo=0, integer=True, optional=True)
        number("num_classes", lo=2, integer=True)
        for name in ("resize", "train_limit"):
            number(name, lo=1, integer=True, optional=True)
        if self.resize is not None and self.resize < self.image_size:
            # the shorter side before the centre crop: a model.pt with resize < input_size cannot be saved (nor read)
            raise ValueError(f"resize must be None or an int >= image_size ({self.image_size}): the shorter image side "
                             f"before the centre {self.image_size}x{self.image_size} crop, got {self.resize!r}")
        number("max_steps", lo=0, integer=True, optional=True)
        for name in ("eval_images", "pad", "cutout"):  # eval_images 0: every held-out image
            number(name, lo=0, integer=True)
        if self.cutout > self.image_size:
            raise ValueError(f"cutout must be at most image_size ({self.image_size}): a {self.cutout}x{self.cutout} square "
                             f"is larger than the {self.image_size}x{self.image_size} training images, got {self.cutout}")
        number("test_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        for name in ("epochs", "lr", "tau", "bce_pos_weight", "eval_every", "masking_clip", "masking_scale"):
            number(name, lo=0, lo_open=True)
        number("time_budget_minutes", lo=0, lo_open=True, optional=True)
        for name in ("weight_decay", "warmup_epochs", "margin_weight", "margin_warmup_epochs", "bce_weight", "ce_weight",
                     "checkpoint_minutes"):
            number(name, lo=0)
        number("kappa")
        for name in ("momentum", "ema", "label_smoothing"):
            number(name, lo=0, hi=1, hi_open=True)
        for name, allowed in (("optimizer", ("adamw", "adam", "sgd")), ("schedule", ("cosine", "onecycle", "constant")),
                              ("loss", ("bagcert", "ce", "masking")), ("margin_reduce", ("min", "mean")), ("data_path", DATA_PATHS),
                              ("masking_evidence", ("logits", "votes")), ("masking_pairs", ("greedy", "all"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.loss == "masking" and self.compile_step:
            raise ValueError("compile_step does not support loss 'masking' (its pair search runs outside autograd); drop it")
        from .models import _is_registered, list_models, load_model_module

        if not isinstance(self.model_modules, list) or not all(isinstance(m, str) and m.strip() for m in self.model_modules):
            raise ValueError(f"model_modules must be a list of .py files or dotted module names, got {self.model_modules!r}")
        for module in self.model_modules:  # imported once per process: a second check is a no-op
            load_model_module(module)
        if not _is_registered(self.model):
            import difflib

            close = difflib.get_close_matches(str(self.model), list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "" if self.model_modules else (
                "; a model of your own is registered by --model-module FILE or an installed plugin "
                "(docs/own_model_plugin.md)")
            raise ValueError(f"model must be a registered model name, got {self.model!r}; available: "
                             f"{', '.join(list_models())}{hint}")
        return self


def check_sync_bn(cfg: "TrainConfig", world: int, device_type: str) -> str | None:
    """Check ``cfg.sync_bn`` for a run of ``world`` processes on ``device_type``; returns a note for the log or None.

    Raises :class:`TrainingError` for ``sync_bn`` under DDP off CUDA: torch's DistributedDataParallel refuses
    ``SyncBatchNorm`` in CPU modules ("SyncBatchNorm layers only work with GPU modules", torch 2.14, gloo). In one
    process there is nothing to synchronise: the note says so."""
    if not cfg.sync_bn:
        return None
    if world > 1 and device_type != "cuda":
        raise TrainingError(f"sync_bn needs CUDA: torch's DistributedDataParallel refuses SyncBatchNorm on {device_type} "
                            "(gloo); train without --sync-bn (each process normalises with its own share of the batch), "
                            "or on GPUs")
    if world == 1:
        return "--sync-bn: one process, nothing to synchronise (batch norm already sees the whole batch)"
    return None


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _make_optimizer(cfg: TrainConfig, model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if getattr(cfg, "fused_optimizer", False) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")


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


def _image_hw(data) -> tuple:
    """``(H, W)`` of the images of an in-memory Dataset or a bagcert.streaming dataset."""
    shape = data.image_shape if hasattr(data, "image_shape") else tuple(data.images.shape[1:])
    return int(shape[-2]), int(shape[-1])


def check_run_inputs(cfg: TrainConfig, train_data, eval_data=None, peer=None) -> None:
    """Refuse, before anything is written or trained, the inputs a run could only fail on later or, worse, train
    and score wrongly with. Raises :class:`TrainingError` (one line) when

    * the training images are not ``image_size`` pixels square (``resize`` for in-memory ``random_crop`` data, which
      is cropped per step) or the held-out images are not ``image_size``: the loss and the certificate would use
      windows built for another image size (CIFAR-style folders are never resized);
    * the training data does not have ``num_classes`` classes, or the held-out data's class names differ from the
      training data's (a renamed, missing or extra class folder would shift every held-out label);
    * a training patch size (the bagcert loss) or an evaluation patch size is malformed or larger than the image;
    * the final ``model.pt`` metadata could not be saved (:func:`bagcert.checkpoint.check_metadata`).
    """
    from .checkpoint import _metadata_problem
    from .geometry import normalize_patch_sizes
    from .streaming import StreamDataset

    s = cfg.image_size
    want = cfg.resize if cfg.random_crop and not isinstance(train_data, StreamDataset) else s
    for what, data, expected in (("training", train_data, want), ("held-out", eval_data, s)):
        if data is None:
            continue
        h, w = _image_hw(data)
        if (h, w) != (expected, expected):
            flag = "--resize" if expected != s else "--image-size"
            raise TrainingError(
                f"the {what} images of {data.name} are {h}x{w} pixels but the run is configured for {expected}x{expected} "
                f"({flag} {expected}): the loss and the certificate would use windows built for another image size; give "
                f"{flag} {h if h == w else 'matching the images'} (CIFAR-style folders are not resized; ImageNet-style "
                "folders are resized and centre-cropped to --image-size)")
    if len(train_data.classes) != cfg.num_classes:
        raise TrainingError(f"the training data has {len(train_data.classes)} classes but num_classes is {cfg.num_classes} "
                            f"(--num-classes)")
    if eval_data is not None and list(eval_data.classes) != list(train_data.classes):
        a, b = list(train_data.classes), list(eval_data.classes)
        only_test = [c for c in b if c not in a]
        only_train = [c for c in a if c not in b]
        detail = "; ".join(x for x in (f"only in the held-out data: {only_test}" if only_test else "",
                                         f"only in the training data: {only_train}" if only_train else "") if x)
        raise TrainingError(
            f"the held-out data's classes differ from the training data's ({detail or 'another order'}): every held-out "
            f"label would be scored against another class; the test split needs the training split's class folders "
            f"({len(a)}: {', '.join(map(str, a[:12]))}{' ...' if len(a) > 12 else ''})")
    groups = [("eval_patch_sizes", cfg.eval_patch_sizes)] if peer is None else []
    if peer is None and cfg.loss in ("bagcert", "masking"):
        groups.insert(0, ("patch_sizes", cfg.patch_sizes))
    for name, sizes in groups:
        try:
            parsed = normalize_patch_sizes(list(sizes))
        except (TypeError, ValueError) as e:
            raise TrainingError(f"{name} ({'--' + name.replace('_', '-')}): {e}") from None
        big = [f"{ph}x{pw}" for ph, pw in parsed if ph > s or pw > s]
        if big:
            raise TrainingError(f"{name} (--{name.replace('_', '-')}) {', '.join(big)} larger than the {s}x{s} images; "
                                "patch sizes must fit inside the image")
    problem = _metadata_problem({"input_size": s, "resize": cfg.resize, "classes": [str(c) for c in train_data.classes]},
                                cfg.num_classes, 1)
    if problem:
        raise TrainingError(f"the final model.pt could not be saved with this configuration: {problem}")


def _data_record(train_data, steps_per_epoch: int, data_path: str = "memory") -> dict:
    """What a checkpoint records about its training data: ``dataset`` (name), ``classes``, the seeded ``split``
    and ``imagenet_indices`` where they apply (:func:`dataset_metadata`), ``steps_per_epoch`` and ``data_path``
    (memory or stream). Stored in last.pt so that :func:`export_checkpoint` writes the same metadata keys as the
    model.pt at the end of training, and so that a resume uses the same data path."""
    return {"dataset": train_data.name, "classes": list(train_data.classes), "steps_per_epoch": steps_per_epoch,
            "data_path": data_path, **dataset_metadata(train_data)}


def _data_metadata(record: dict) -> dict:
    """The checkpoint metadata keys of a :func:`_data_record`."""
    return {k: v for k, v in record.items() if k not in ("steps_per_epoch", "data_path")}


def train(cfg: TrainConfig, train_data, eval_data=None, resume: bool = False, log=print, data_path_reason: str | None = None) -> dict:
    """Train a model with ``cfg``; returns a summary dict (``steps``, ``wall_seconds``, ``output``, ``eval``).

    ``train_data`` / ``eval_data``: in-memory :class:`~bagcert.data.Dataset` (uint8 images, the fast path) or
    :mod:`bagcert.streaming` datasets (decoded per batch by ``cfg.workers`` loader processes; the training stream's
    ``augment`` must be :func:`stream_augmentation` of ``cfg``). Which path runs is logged, with
    ``data_path_reason`` (e.g. :func:`bagcert.streaming.choose_data_path`'s) when given, as a ``data_path`` record.

    Writes into ``cfg.output``: ``config.json``, ``train_log.jsonl`` (JSON lines), ``last.pt`` (every
    ``checkpoint_minutes`` and at the end) and ``model.pt`` (``peer_classifier.pt`` for a peer) at the end.

    Stop: SIGINT or SIGTERM during the call finishes the current step, writes ``last.pt`` and a ``stopped`` log
    record, and returns with ``summary["stopped"]`` (the signal's name) and ``summary["exit_status"]``
    (128 + signal number); no model.pt is written. Under torch.distributed every rank stops after the same step.
    The previous signal handlers are restored on return. An unexpected error once training has started (a loader
    worker killed, an undecodable image on the stream path, ...) likewise writes ``last.pt`` with the finished steps
    and an ``error`` log record, and raises :class:`TrainingFailed` (one line; ``__cause__`` is the error).

    Resume (``resume=True`` with a ``last.pt``): the arguments are compared with the stored config before anything
    is written (:func:`resume_config_changes`), and the data path (memory or stream) must be the stored one; the
    log is cut back to the checkpoint's step (:func:`cut_log`) and a ``resumed`` record lists the allowed changes.
    A finished run (its log ends with the ``done`` record of the checkpoint's step and no later end is asked for)
    is left byte-identical: ``summary["already_finished"]``.

    Before anything is written, :func:`check_run_inputs` refuses data of another image size or other held-out classes,
    patch sizes that do not fit the image and a configuration whose model.pt could not be saved.

    Raises :class:`TrainingError` (a ValueError) for a run that cannot start or continue as configured, ValueError
    from :meth:`TrainConfig.check`, :class:`~bagcert.checkpoint.CheckpointError` for an unreadable ``last.pt``.
    """
    with StopSignals() as stop:
        return _train_run(cfg, train_data, eval_data, resume, log, stop, data_path_reason)


def train_step(fwd, optimizer, micro_batches, loss_of, lr: float, accum: int = 1, no_sync=None, amp: bool = False,
               device_type: str = "cpu") -> dict:
    """One optimiser step over ``accum`` micro-batches; returns the statistics (0-d device tensors), averaged.

    ``micro_batches``: ``accum`` pairs ``(x, y)``; ``loss_of(output, y)`` returns ``(loss, stats)``. The learning
    rate of every parameter group is set to ``lr``, each micro-batch's loss is divided by ``accum`` and its
    gradient added, so that for a loss that is a mean over samples (and a model without batch statistics) the
    step equals one step on the concatenated batch, up to float rounding. ``no_sync``: the DDP module's
    ``no_sync`` context manager, entered for all but the last micro-batch (one gradient all-reduce per step).
    ``amp``: bf16 autocast of the forward pass.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums = {}
    for j, (x, y) in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and j < accum - 1 else contextlib.nullcontext()
        with sync:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
                z = fwd(x)
            loss, stats = loss_of(z, y)
            # DDP averages gradients over ranks; per-rank losses are means over the rank's samples
            (loss / accum if accum > 1 else loss).backward()
        for key, v in stats.items():
            sums[key] = sums[key] + v if key in sums else v
    optimizer.step()
    return sums if accum == 1 else {k: v / accum for k, v in sums.items()}


def _resolve_workers(cfg: TrainConfig) -> int:
    """Loader processes of the stream path: ``cfg.workers``, or min(8, CPUs) when None."""
    return cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)


def _training_batches(cfg: TrainConfig, train_data, rank: int, world: int, device, peer):
    """MemoryBatches for a Dataset, StreamBatches for a bagcert.streaming dataset (whose augmentation must be cfg's)."""
    from .streaming import StreamDataset

    if isinstance(train_data, StreamDataset):
        expected = stream_augmentation(cfg)
        if train_data.augment != expected:
            raise TrainingError(
                f"the training stream augments with {train_data.augment!r} but the config asks for {expected!r} "
                f"(flip {cfg.flip}, pad {cfg.pad}, random_crop {cfg.random_crop}); open it with augment={expected!r}"
            )
        return StreamBatches(train_data, cfg, rank, world, device, peer, workers=_resolve_workers(cfg))
    if not isinstance(train_data, Dataset):
        raise TypeError(f"train_data must be a bagcert.data.Dataset or a bagcert.streaming dataset, got {type(train_data).__name__}")
    return MemoryBatches(train_data, cfg, rank, world, device, peer)


def _build_model(cfg: TrainConfig, peer, device):
    """(model, init_from record or None), on ``device``, channels_last if configured; seeded by cfg.seed."""
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
    return model, init_info


def _loss_function(cfg: TrainConfig, model, peer, margin_warm: int):
    """``loss_of(step) -> (output, y) -> (loss, stats)``: the bagcert loss (margin weight warmed up over
    ``margin_warm`` steps) or cross-entropy on the mean logits (a peer: on its logits)."""
    if cfg.loss == "ce":
        def loss_of(step):
            def f(z, y):
                logits = z.float() if peer is not None else z.float().mean(dim=(2, 3))
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                return loss, {"loss": loss.detach()}
            return f
        return loss_of
    if cfg.loss == "masking":
        from .losses_masking import masking_loss_of
        return masking_loss_of(cfg, model.geometry, margin_warm)
    loss_fn = BagCertLoss(
        model.geometry, (cfg.image_size, cfg.image_size), cfg.patch_sizes, tau=cfg.tau, kappa=cfg.kappa,
        margin_weight=cfg.margin_weight, bce_weight=cfg.bce_weight, ce_weight=cfg.ce_weight,
        label_smoothing=cfg.label_smoothing, bce_pos_weight=cfg.bce_pos_weight, margin_reduce=cfg.margin_reduce,
    )

    def loss_of(step):
        mw = cfg.margin_weight * min(1.0, step / margin_warm)

        def f(z, y):
            loss, stats = loss_fn(z, y, margin_weight=mw)
            stats["robust_train"] = (stats.pop("margin") > 0).float().mean()
            return loss, stats
        return f
    return loss_of


def _identity(x):
    return x


def _compiled_step_loss(cfg: TrainConfig, net, model, peer, margin_warm: int):
    """``loss_of(step) -> (x, y) -> (loss, stats)`` that runs the forward pass of ``net`` (bf16 autocast with
    ``cfg.amp``) and the loss of :func:`_loss_function` as one ``torch.compile``d function, for ``train_step`` with
    the identity as its forward (``cfg.compile_step``).

    The bagcert loss's margin weight (warmed up over ``margin_warm`` steps) is passed as a 0-d tensor, so that its
    changing value does not make dynamo recompile at every step; with a tensor weight the margin term is always
    computed (weight 0 adds 0). The forward pass and the loss are the same operations as without ``compile_step``;
    inductor's fused kernels round differently in the last bits, as with ``cfg.compile``.
    """
    device_type = next(model.parameters()).device.type
    if cfg.loss == "ce":
        inner = _loss_function(cfg, model, peer, margin_warm)(0)

        def ce_step(x, y):
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.amp):
                z = net(x)
            return inner(z, y)

        compiled = torch.compile(ce_step)
        return lambda step: compiled
    loss_fn = BagCertLoss(
        model.geometry, (cfg.image_size, cfg.image_size), cfg.patch_sizes, tau=cfg.tau, kappa=cfg.kappa,
        margin_weight=cfg.margin_weight, bce_weight=cfg.bce_weight, ce_weight=cfg.ce_weight,
        label_smoothing=cfg.label_smoothing, bce_pos_weight=cfg.bce_pos_weight, margin_reduce=cfg.margin_reduce,
    )

    def bagcert_step(x, y, mw):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.amp):
            z = net(x)
        loss, stats = loss_fn(z, y, margin_weight=mw)
        stats["robust_train"] = (stats.pop("margin") > 0).float().mean()
        return loss, stats

    compiled = torch.compile(bagcert_step)

    def loss_of(step):
        mw = torch.tensor(cfg.margin_weight * min(1.0, step / margin_warm), dtype=torch.float32)
        return lambda x, y: compiled(x, y, mw.to(x.device))
    return loss_of


def _write_config(out: Path, cfg: TrainConfig) -> None:
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")


def _train_run(cfg: TrainConfig, train_data, eval_data, resume: bool, log, stop: StopSignals, data_path_reason=None) -> dict:
    # --- setup: process group, checks (nothing written before they pass) ---
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
    sync_note = check_sync_bn(cfg, world, device.type)
    peer = _peer_spec(cfg)  # None for a bagcert model; checks the spec before anything is written
    out = check_output_folder(cfg.output)
    is_main = rank == 0
    check_run_inputs(cfg, train_data, eval_data, peer)
    batches = _training_batches(cfg, train_data, rank, world, device, peer)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch < 1:
        accum = f" x {cfg.grad_accum} accumulated micro-batches" if cfg.grad_accum > 1 else ""
        raise TrainingError(f"{batches.n} training images are fewer than one batch of {cfg.batch_size}{accum}")

    ckpt = Checkpointer(out, is_main, cfg.checkpoint_minutes)
    state, changes = ckpt.load(resume, lambda stored: resume_config_changes(stored, cfg))  # refuses before writing
    budgeted = cfg.time_budget_minutes is not None
    run = RunState(steps_per_epoch, 0, max_steps=cfg.max_steps, planned=not budgeted)
    if state is not None:
        stored_path = (state.get("data") or {}).get("data_path", "memory")
        if stored_path != batches.path:
            raise TrainingError(
                f"--resume: the run in {out} trained on the {stored_path} data path and this one would use the {batches.path} "
                f"path (its augmentation differs): resume with --data-path {stored_path}"
            )
        run.step, run.wall_before = int(state["step"]), float(state.get("wall_seconds", 0.0))
        if budgeted and state.get("planned_total_steps") is not None:
            run.planned = True
            cfg = replace(cfg, epochs=int(state["planned_total_steps"]) / steps_per_epoch)  # config.json keeps the plan
            if state.get("schedule_anchor") is not None:
                run.anchor = (int(state["schedule_anchor"][0]), float(state["schedule_anchor"][1]))
    run.total_steps = int(round(cfg.epochs * steps_per_epoch))
    if state is not None and budgeted and state.get("planned_total_steps") is not None:
        run.total_steps = int(state["planned_total_steps"])
    run.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    margin_warm = max(1, int(round(cfg.margin_warmup_epochs * steps_per_epoch)))

    tlog = TrainLog(out, is_main, cfg.tensorboard, log)
    if state is not None and run.step >= run.end:
        finished = _from_rank0([1.0 if is_main and log_ends_done(tlog.path, run.step) else 0.0], world)[0]
        if finished:
            if is_main:
                unused = f"; the changed {', '.join(changes)} were not applied" if changes else ""
                log(f"{out} holds a finished run ({run.step} steps, model written, log done); nothing to do, nothing changed "
                    f"(a later end, --epochs or --max-steps, continues it){unused}")
            return {"steps": run.step, "wall_seconds": run.wall_before, "output": str(out), "already_finished": True}

    # --- the run's folder and log ---
    tlog.start(run.step, resumed=state is not None)
    if is_main:
        _write_config(out, cfg)
        if state is not None:
            tlog.append({"step": run.step, "resumed": {"wall_seconds": run.wall_before, "changed": changes}})
    workers = _resolve_workers(cfg) if batches.path == "stream" else 0
    reason = data_path_reason or (f"{batches.path}: a {'bagcert.streaming' if batches.path == 'stream' else 'in-memory'} "
                                  f"dataset was passed to train()")
    tlog.append({"step": run.step, "data_path": {"path": batches.path, "reason": reason, "workers": workers,
                                                 "images": batches.n}})
    if is_main:
        log(f"data path {reason}" + (f"; {workers} loader worker(s)" if batches.path == "stream" else ""))
    if cfg.lr_scale_batch is not None:
        rule = {"lr": cfg.lr, "global_batch": cfg.batch_size * cfg.grad_accum, "base_batch": cfg.lr_scale_batch,
                "peak_lr": base_lr(cfg), "rule": "lr * batch_size * grad_accum / lr_scale_batch"}
        tlog.append({"step": run.step, "lr_rule": rule})
        if is_main:
            log(f"learning rate scaled linearly with the global batch: {cfg.lr:g} x {rule['global_batch']} / "
                f"{cfg.lr_scale_batch} = {rule['peak_lr']:g}")

    # --- model, optimiser, EMA, loss ---
    model, init_info = _build_model(cfg, peer, device)
    if is_main and init_info and init_info.get("summary"):
        log(f"--init-from: {init_info['summary']}")
    opt = _make_optimizer(cfg, model)
    ema = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    loss_of = _loss_function(cfg, model, peer, margin_warm)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if is_main:
            log(f"resumed from {ckpt.path} at step {run.step}/{run.total_steps}"
                + (f"; changed: {', '.join(f'{k} {o!r} -> {v!r}' for k, (o, v) in changes.items())}" if changes else ""))
    elif resume and is_main:
        log(f"no checkpoint at {ckpt.path}; starting from scratch")
    state = None  # the weights are loaded; the checkpointer builds its own
    data_record = _data_record(train_data, steps_per_epoch, batches.path)

    # forward = local_logits (a peer classifier: its logits), so DDP and torch.compile see the training output
    net = model if peer is not None else _LocalLogits(model)
    if is_main and sync_note:
        log(sync_note)
    if world > 1 and cfg.sync_bn:
        # in place: model's BatchNorm layers become SyncBatchNorm sharing their parameters and buffers (the optimiser
        # and the checkpoint see the same tensors; the state-dict keys are those of BatchNorm2d)
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        if is_main:
            log(f"--sync-bn: {bn} batch-norm layer(s) normalise with the statistics of the global batch"
                if bn else "--sync-bn: the model has no batch-norm layer; nothing to synchronise")
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(net) if cfg.compile and not cfg.compile_step else net
    if cfg.compile_step:  # forward and loss in one compiled function; train_step's forward is then the identity
        loss_of = _compiled_step_loss(cfg, net, model, peer, margin_warm)
        fwd = _identity
    no_sync = net.no_sync if world > 1 and cfg.grad_accum > 1 else None
    tlog.open_tensorboard()

    eval_every_steps = max(1, int(round(cfg.eval_every * steps_per_epoch)))
    evaluator = None if eval_data is None else Evaluator(
        eval_data, cfg.eval_patch_sizes, device, rank, world, peer, cfg.seed, workers=workers, amp=cfg.eval_amp)
    pbar = None
    t_start = time.perf_counter()

    def elapsed() -> float:
        return run.wall_before + time.perf_counter() - t_start

    def new_total(run: RunState) -> None:  # a (re-)planned budget: config.json records it, the bar follows
        nonlocal cfg
        cfg = replace(cfg, epochs=run.total_steps / steps_per_epoch)
        if is_main:
            _write_config(out, cfg)
        if pbar is not None:
            pbar.total = run.end
            pbar.refresh()

    budget = None if not budgeted else TimeBudget(
        cfg.time_budget_minutes, run, eval_every_steps, tlog, elapsed, new_total, world, sync=lambda: _sync(device))
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=run.end, initial=run.step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def save() -> None:
        ckpt.save(run, json.loads(json.dumps(asdict(cfg))), model, opt, ema, data_record, elapsed(), budgeted)

    # --- the loop ---
    window = StatWindow()
    summary, stopped = {}, 0
    model.train()
    # True from the optimiser's step (the first change of the weights) until run.step counts the step
    partial = {"step": False}
    opt.register_step_pre_hook(lambda *a: partial.__setitem__("step", True))
    try:
        while run.step < run.end:
            lr = _lr_at(cfg, run.step, run.total_steps, run.warmup, run.anchor)
            stats = train_step(fwd, opt, batches.micro_batches(run.step), loss_of(run.step), lr, cfg.grad_accum, no_sync,
                               cfg.amp, device.type)
            if ema is not None:
                ema_update(ema, model, ema_decay(cfg.ema, run.step))
            run.step += 1
            partial["step"] = False
            window.add(stats, batches.step_batch)
            if budget is not None and budget.calibration_done(run):
                budget.plan(run, lambda: evaluator.probe_seconds(ema if ema is not None else model) if evaluator else 0.0)
            if pbar is not None:
                pbar.update(1)
            if run.step % cfg.log_every == 0 or run.step == run.end:
                means, ips = window.flush()
                rec = {"step": run.step, "epoch": run.epoch, "lr": lr, "images_per_s": ips, **means}
                tlog.append(rec)
                tlog.scalars("train", rec, run.step)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{means['loss']:.3f}", ips=f"{ips:.0f}", ep=f"{run.epoch:.2f}")
            if evaluator is not None and (run.step % eval_every_steps == 0 or run.step == run.end):
                _sync(device)
                t_eval0 = time.perf_counter()
                m_eval = ema if ema is not None else model
                ev = evaluator(m_eval)
                tlog.append({"step": run.step, "epoch": run.epoch, "eval": ev, "wall_seconds": elapsed()})
                summary["eval"] = ev
                if is_main:
                    log(f"[eval] epoch {run.epoch:.2f}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k != "n"))
                tlog.scalars("eval", ev, run.step)
                if tlog.writer is not None:
                    tlog.figure("eval/vote_map", evaluator.vote_figure(m_eval), run.step)
                if budget is not None:
                    budget.evaluated(run, t_eval0)
            # checkpoint and stop decisions must be identical on all ranks: rank 0's clock decides the checkpoint, a
            # signal on any rank stops every rank after this step (one all_reduce of both flags)
            due, signum = _checkpoint_and_stop(ckpt.due(), stop, world)
            if due or signum:
                save()
            if signum:
                stopped = signum
                break
    except TrainingError:  # a refusal of the run's own (a time budget too small): as it says, nothing to keep
        batches.close()
        raise
    except Exception as e:  # an unexpected error (a loader worker killed, an undecodable file): keep the finished steps
        batches.close()
        if pbar is not None:
            pbar.close()
        raise _failed_run(e, run, out, partial["step"], save, tlog, elapsed) from e
    batches.close()
    if pbar is not None:
        pbar.close()
    if stopped:
        name = signal.Signals(stopped).name
        wall = elapsed()
        tlog.append({"step": run.step, "stopped": name, "wall_seconds": wall})
        tlog.close()
        summary.update({"steps": run.step, "wall_seconds": wall, "output": str(out), "stopped": name,
                        "exit_status": 128 + stopped})
        return summary
    save()
    wall = elapsed()
    if is_main:
        _export_final(cfg, ema if ema is not None else model, peer, out, data_record, init_info, run, wall, world, summary)
        tlog.append({"done": True, "steps": run.step, "wall_seconds": wall})
    tlog.close()
    summary.update({"steps": run.step, "wall_seconds": wall, "output": str(out)})
    return summary


class TrainingFailed(TrainingError):
    """A run ended by an unexpected error after it started training (a DataLoader worker killed, an undecodable
    image on the stream path, ...). ``step``: the optimiser steps finished; ``checkpoint``: the ``last.pt`` that
    holds them (None when the error hit inside a step whose weights could not be saved consistently);
    ``__cause__`` is the original exception. The message is one line with the continuation command."""

    def __init__(self, message: str, step: int, checkpoint):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def _error_line(e: BaseException) -> str:
    """One line for an exception: a DataLoader worker's wrapped error is cut to its original last line."""
    text = str(e).strip()
    if "Original Traceback" in text:  # "...\nbagcert.data.DatasetError: <message>": the original's last line
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        head, sep, rest = text.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum():
            return f"{head.rsplit('.', 1)[-1]}: {' '.join(rest.split())}"
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text}"


def _failed_run(e: Exception, run: RunState, out: Path, in_step: bool, save, tlog, elapsed) -> TrainingFailed:
    """Save what a run finished before the error ``e`` (as a signal stop does: ``last.pt`` and a log record) and
    return the :class:`TrainingFailed` to raise. ``in_step``: the error came after the optimiser began to change
    the weights of a step not yet counted (inside ``optimizer.step`` or the EMA update); those weights match no step,
    so the last periodic ``last.pt`` is kept then. An error while reading a step's data, in its forward or backward
    pass or in an evaluation leaves the weights of the finished steps: they are saved."""
    what = _error_line(e)
    saved = None
    if not in_step:
        try:
            save()
            saved = out / "last.pt"
        except Exception as save_error:  # the disk is full, ...: say so, keep the original error
            what += f"; writing last.pt failed too ({_error_line(save_error)})"
    try:
        tlog.append({"step": run.step, "error": what, "wall_seconds": elapsed(), "checkpoint": saved is not None})
        tlog.close()
    except Exception:
        pass
    if saved is not None:
        tail = (f"{saved} holds the {run.step} finished steps; fix the cause and continue with: train.py --config "
                f"{out / 'config.json'} --resume")
    elif (out / "last.pt").is_file():
        tail = f"{out / 'last.pt'} holds the last periodic checkpoint; continue with: train.py --config {out / 'config.json'} --resume"
    else:
        tail = "no checkpoint was written"
    return TrainingFailed(f"training failed during step {run.step + 1} ({what}); {tail}", run.step, saved)


def _export_final(cfg, final_model, peer, out, data_record, init_info, run, wall, world, summary) -> None:
    """model.pt (a peer: peer_classifier.pt) at the end of a run, with its metadata."""
    meta = {
        "config": json.loads(json.dumps(asdict(cfg))),
        **_data_metadata(data_record),
        "input_size": cfg.image_size,
        "trained_steps": run.step,
        "epochs": run.epoch,
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
    if cfg.resize is not None and cfg.resize >= cfg.image_size:
        meta["resize"] = cfg.resize
    elif cfg.resize is not None:
        # a run from before TrainConfig.check refused it: no loader resizes below the crop, so its images were never
        # resized (a CIFAR-10 layout ignores resize); the export records what was asked and what applied
        meta["ignored_resize"] = cfg.resize
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


def leave_process_group(failed: bool = False) -> None:
    """End a torch.distributed run: every rank leaves the process group together (a rank that exits early
    aborts gloo's peers). Does nothing outside torch.distributed.

    ``failed=True``: the run is ending with an error or a signal (torchrun stops the other ranks with SIGTERM
    when one dies). Then this rank leaves without waiting for the others: a peer may be gone, and the barrier
    would end in gloo's "Connection closed by peer" traceback after the run's own one-line message."""
    if dist.is_available() and dist.is_initialized():
        if failed:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the run's own error is what the user needs to see
                pass
            return
        dist.barrier()
        dist.destroy_process_group()


def _init_from_checkpoint(model, path) -> dict:
    """Load a model checkpoint's weights into ``model`` (a warm start, e.g. to continue a finished run with a
    new schedule): a bagcert checkpoint of the same architecture (``dense`` may differ: a strided model
    fine-tuned as its dense evaluation, see :class:`bagcert.models.CifarBagNet`), or the public BagNet-9/17/33 ImageNet
    weights in the original repository's state-dict layout (Brendel & Bethge, ICLR 2019) for ``bagnet9/17/33``,
    converted by :func:`bagcert.models.convert.load_bagnet_state_dict` (the 1000-class head is loaded only when
    the class count matches). Returns what is known about the source. Raises CheckpointError / TrainingError."""
    from .checkpoint import FORMAT, load_checkpoint
    from .models import BagNet
    from .models.convert import load_bagnet_state_dict, read_weights_file

    obj = read_weights_file(path)  # weights-only; a refused or unreadable file is a CheckpointError
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        if not isinstance(model, BagNet):
            raise TrainingError(
                f"--init-from {path}: not a bagcert checkpoint; weights in the original BagNet layout load only into "
                f"bagnet9/bagnet17/bagnet33, not {model.config['name']}"
            )
        report = load_bagnet_state_dict(obj, model, name=str(path))
        return {"path": str(path), "source": "bagnet-original",
                **{k: report[k] for k in ("source_receptive_field", "loaded", "skipped", "skip_reason", "summary")}}
    src, src_meta = load_checkpoint(path)
    if _weights_config(src) != _weights_config(model):
        raise TrainingError(
            f"--init-from {path}: its model {src.config['name']} {src.config['kwargs']} differs from the configured "
            f"{model.config['name']} {model.config['kwargs']} (only \"dense\" may differ)"
        )
    model.load_state_dict(src.state_dict())
    return {
        "path": str(path),
        "trained_steps": src_meta.get("trained_steps"),
        "epochs": src_meta.get("epochs"),
        "wall_seconds": src_meta.get("wall_seconds"),
        "dense": bool(src.config["kwargs"].get("dense", False)),
    }


def _weights_config(model) -> dict:
    """A model's config without its ``dense`` switch and with its class count: a strided network and its dense
    (a trous) evaluation share every weight, so either initialises the other."""
    kwargs = {k: v for k, v in model.config["kwargs"].items() if k != "dense"}
    kwargs["num_classes"] = model.num_classes
    # a checkpoint stores tuples (mean, std) as lists: compare the JSON forms
    return json.loads(json.dumps({"name": model.config["name"], "kwargs": kwargs}, sort_keys=True))


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
    buffers (e.g. BatchNorm's step counter) are copied.

    One fused ``torch._foreach_lerp_`` over all floating-point tensors (``ema + (1 - decay) * (model - ema)``)
    instead of two kernels per tensor.
    """
    floats_e, floats_m = [], []
    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
        if pe.dtype.is_floating_point:
            floats_e.append(pe)
            floats_m.append(pm.detach())
        else:
            pe.copy_(pm)
    if floats_e:
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - decay)


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
