"""Certified training: the loop and its parts. The command line is :mod:`bagcert.cli.train`; a whole run from a
:class:`TrainConfig` (its data loaded and checked) is :func:`bagcert.runs.train.train_run`.

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

Peer base classifiers (``cfg.peer``, e.g. ``"drs-column:4"`` or ``"patchcleanser:5"``; see
:mod:`bagcert.peers.spec`): the model is the peer's :class:`~bagcert.peers.PooledClassifier`, the loss
cross-entropy on its logits, and every augmented batch goes through the peer's training transform
(random ablation / random masks), seeded by (seed, e, k) and drawn for the global batch like the
augmentation. The result is ``<output>/peer_classifier.pt`` (``bagcert.peers.load_peer_certifier``).

The package's modules, each named by what it holds (every public name is importable from ``bagcert.training``):

* :mod:`.config`: :class:`TrainConfig` and its checks (:func:`check_run_inputs`);
* :mod:`.loop`: :func:`train` and :func:`train_step`;
* :mod:`.batches`: the training data as the batches of a step (:class:`MemoryBatches`, :class:`StreamBatches`);
* :mod:`.loss`, :mod:`.schedule` (learning rate, optimiser), :mod:`.ema`, :mod:`.model` (building, ``init_from``);
* :mod:`.state`: :class:`RunState`, :class:`Checkpointer` (``last.pt``), :class:`StopSignals`, resuming;
* :mod:`.log`: :class:`TrainLog`, :class:`StatWindow`; :mod:`.budget`: :class:`TimeBudget` and its planning;
* :mod:`.evaluation`: :func:`evaluate`, :class:`Evaluator`; :mod:`.export`: :func:`export_checkpoint`;
* :mod:`.distributed`: :func:`distributed_env`, :func:`leave_process_group`; :mod:`.errors`: :class:`TrainingError`.
"""

from __future__ import annotations

from .batches import MemoryBatches, StreamBatches, stream_augmentation
from .budget import (
    REPLAN_WINDOW, TimeBudget, calibration_window, plan_total_steps, projected_seconds, replan_total_steps,
    window_seconds_per_step,
)
from .config import DATA_PATHS, TrainConfig, check_run_inputs
from .distributed import check_sync_bn, distributed_env, leave_process_group
from .ema import ema_decay, ema_update
from .errors import TrainingError, TrainingFailed
from .evaluation import Evaluator, evaluate
from .export import dataset_metadata, export_checkpoint
from .log import StatWindow, TrainLog, cut_log, log_ends_done
from .loop import train, train_step
from .schedule import base_lr
from .state import (
    RESUME_ALLOWED, RESUME_REFUSED, RUN_FILES, Checkpointer, RunState, StopSignals, check_output_folder,
    remove_stale_temporaries, resume_config_changes,
)

# private helpers that were importable from bagcert.training / bagcert.training_parts before the package existed
# (tests, benchmarks). They are bound here once: to wrap one for the loop, patch it in bagcert.training.loop.
from .batches import _finish, _resolve_workers, _seeded, _to_float, _training_batches  # noqa: E402,F401
from .config import _image_hw, _peer_spec  # noqa: E402,F401
from .distributed import _checkpoint_and_stop, _from_rank0, _sync  # noqa: E402,F401
from .evaluation import _eval_batches, _evaluate_peer, _float_images, _vote_figure  # noqa: E402,F401
from .export import _data_metadata, _data_record, _export_final  # noqa: E402,F401
from .log import _log_lines  # noqa: E402,F401
from .loop import _error_line, _failed_run, _train_run  # noqa: E402,F401
from .loss import _compiled_step_loss, _identity, _loss_function  # noqa: E402,F401
from .model import _build_model, _init_from_checkpoint, _LocalLogits, _weights_config  # noqa: E402,F401
from .schedule import _lr_at, _make_optimizer, _progress  # noqa: E402,F401
from .state import _RUN_TEMPORARY, _write_config  # noqa: E402,F401

__all__ = [
    "TrainConfig", "TrainingError", "train", "evaluate", "distributed_env", "export_checkpoint", "dataset_metadata",
    "leave_process_group", "resume_config_changes", "RESUME_ALLOWED", "RESUME_REFUSED", "check_output_folder",
    "remove_stale_temporaries", "cut_log", "log_ends_done", "StopSignals", "train_step", "calibration_window",
    "plan_total_steps", "replan_total_steps", "window_seconds_per_step", "ema_decay", "ema_update", "base_lr",
    "stream_augmentation", "RunState", "Checkpointer", "TimeBudget", "TrainLog", "StatWindow", "Evaluator",
    "MemoryBatches", "StreamBatches", "DATA_PATHS", "check_run_inputs", "TrainingFailed",
    "check_sync_bn", "projected_seconds", "REPLAN_WINDOW", "RUN_FILES",
]
