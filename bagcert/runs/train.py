"""A whole training run from a :class:`~bagcert.training.TrainConfig`: :func:`train_run`.

It does what ``bagcert train`` / ``train.py`` does besides reading argv: checks the config and the machine (the
device, loader processes, the output folder, the model), picks the recipe's dataset or the bundled samples, checks
the image size of a CIFAR-10 layout, chooses the data path (memory or stream), loads the training and held-out data
(a seeded split where the dataset has none, a class-stratified ``train_limit`` draw, ``eval_images`` held-out
images) and calls the training loop, :func:`bagcert.training.train`.

Example::

    from bagcert import TrainConfig, train_run

    summary = train_run(TrainConfig(dataset="samples/cifar10/test", model="cifar_bagnet5_s2",
                                    model_kwargs={"width": 8}, batch_size=8, max_steps=2, output="runs/smoke"))
    print(summary["output"], summary["steps"], summary["eval"])
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch

from ..data import DatasetError, load_dataset, seeded_split
from ..streaming import choose_data_path, decoded_size_bytes, open_stream
from ..training import (
    TrainConfig, TrainingError, check_output_folder, check_sync_bn, distributed_env, stream_augmentation, train,
)
from . import _checks
from ._io import check_output_outside_dataset, check_workers_apply, show_path


def check_device(value, name: str = "device") -> str:
    """``value`` as a torch device this machine has (:func:`bagcert.runs._checks.device`); ValueError naming ``name``."""
    try:
        return _checks.device(value)
    except ValueError as e:
        raise ValueError(f"{name} {value!r}: {e}") from None


def check_workers(value, name: str = "workers") -> int:
    """``value`` loader processes, an int >= 0 that fits this machine (:func:`bagcert.runs._checks.workers`)."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    try:
        return _checks.workers(value)
    except ValueError as e:
        raise ValueError(f"{name} {value}: {e}") from None

__all__ = ["train_run", "RECIPE_DATASET", "check_run_values", "resolve_dataset"]

#: The dataset of the training recipe (``bagcert train``'s default): the shared CIFAR-10 folder beside a checkout.
#: Where it does not exist, :func:`train_run` trains on the 200 CIFAR-10 test images bundled with bagcert instead
#: (:func:`resolve_dataset`).
RECIPE_DATASET = "../shared/data/cifar10"


def train_run(config: TrainConfig, *, model_modules=(), resume: bool = False, log=print) -> dict:
    """Load the data ``config`` names, check it against the config and train (:func:`bagcert.training.train`).

    ``model_modules``: .py files or dotted modules imported first, so that their ``bagcert.register_model`` calls
    take effect (added to ``config.model_modules``, which config.json records). ``resume``: continue the run in
    ``config.output`` from its ``last.pt`` (``train.py --resume``). ``log``: where progress lines go (stdout by
    default); notes about choices made for the user (the bundled samples, a seeded split, a stratified draw) go to
    stderr, on rank 0.

    Returns the loop's summary dict: ``steps``, ``wall_seconds``, ``output``, ``eval`` (the last held-out
    evaluation); after a SIGINT / SIGTERM stop also ``stopped`` (the signal's name) and ``exit_status``
    (128 + signal number), and ``already_finished`` for a resume of a finished run. Writes into ``config.output``
    what :func:`bagcert.training.train` writes (``config.json``, ``train_log.jsonl``, ``last.pt``, ``model.pt``).

    Raises, each with one line and before anything is written: ``ValueError`` for a config no run can use
    (:meth:`TrainConfig.check`, :func:`check_run_values`), :class:`~bagcert.training.TrainingError` (a
    ValueError) for a run that cannot start as configured (an output folder that cannot be written or lies inside
    the dataset, a model its arguments cannot build, images of another size than ``image_size``, a data path the
    augmentation does not allow, another number of classes), :class:`~bagcert.data.DatasetError` for data that
    cannot be read and :class:`~bagcert.checkpoint.CheckpointError` for an unreadable ``last.pt`` or ``init_from``;
    :class:`~bagcert.training.TrainingFailed` after an unexpected error mid-run (``last.pt`` keeps the finished
    steps).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a bagcert.training.TrainConfig, got {type(config).__name__}")
    if not isinstance(resume, bool):  # resume="no" would be truthy
        raise ValueError(f"resume must be True or False, got {resume!r}")
    if not callable(log):
        raise ValueError(f"log must be a function taking one line of text (print, or lambda *a: None), got {log!r}")
    if isinstance(model_modules, (str, os.PathLike)):  # one file or module
        model_modules = [model_modules]
    own = config.model_modules
    for name, value in (("model_modules", model_modules), ("config.model_modules", own)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(m, (str, os.PathLike)) for m in value):
            # a lone "my_models.py" in the config would be read letter by letter
            raise ValueError(f"{name} must be a list of .py files or dotted module names, got {value!r}")
    own = [os.fspath(m) for m in own]
    given = [os.fspath(m) for m in model_modules]
    modules = own + [m for m in given if m not in own]
    cfg = replace(config, model_modules=modules, dataset=resolve_dataset(config.dataset))
    cfg.check()  # imports the model modules; ValueError naming the field
    check_run_values(cfg)
    _check_peer(cfg)
    check_output_folder(cfg.output)  # before loading data or building anything
    try:
        check_output_outside_dataset(cfg.output, cfg.dataset, flag="output")
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.init_from is not None and not os.path.isfile(cfg.init_from):  # read only once the run folder is written
        raise TrainingError(f"--init-from {cfg.init_from}: file not found; expected a bagcert model checkpoint (or BagNet "
                            "weights for bagnet9/17/33)")
    if not cfg.peer:
        _check_model(cfg)
    rank, world, _ = distributed_env()
    check_sync_bn(cfg, world, torch.device(cfg.device).type)
    if cfg.peer and rank == 0:
        log(f"training the base classifier of peer {cfg.peer} ({cfg.model}) with cross-entropy; the bagcert loss options "
            "are unused")
    size = cfg.image_size
    if cfg.random_crop and (cfg.resize is None or cfg.resize < size):
        raise TrainingError(f"--random-crop needs --resize >= --image-size ({size}), got resize {cfg.resize}")
    train_size = cfg.resize if cfg.random_crop else size
    if cfg.data_path == "memory":
        _check_workers_apply(cfg.workers, "memory", "memory")  # refused before any image is read
    _check_cifar_size(cfg)
    path, reason, train_data = _choose_data_path(cfg, train_size)
    if rank == 0 and cfg.data_path == "auto":
        _check_workers_apply(cfg.workers, "auto", path)  # auto chose memory: said on stderr
    train_data, eval_data = _held_out(cfg, path, train_data, rank)
    return train(cfg, train_data, eval_data, resume=resume, log=log, data_path_reason=reason)


def resolve_dataset(dataset: str) -> str:
    """The dataset a run reads: ``dataset`` itself, except :data:`RECIPE_DATASET` where that folder does not exist
    (outside a checkout beside ``../shared/data``): then the bundled CIFAR-10 samples' image folder, which training
    cuts with its seeded train/test split; said on stderr (rank 0)."""
    if dataset != RECIPE_DATASET or os.path.isdir(RECIPE_DATASET):
        return dataset
    from ..shipped import samples_path

    folder = show_path(samples_path("cifar10") / "test")
    if os.environ.get("RANK", "0") == "0":
        print(f"no --dataset and no {RECIPE_DATASET} here: training on the 200 CIFAR-10 test images bundled with "
              f"bagcert ({folder}, a seeded train/test split): a smoke test; give --dataset for a real run", file=sys.stderr)
    return folder


def check_run_values(cfg: TrainConfig) -> None:
    """The values that depend on this machine or that no run can use, beyond :meth:`TrainConfig.check`: the
    ``device`` exists here, ``workers`` loader processes fit its cores and memory, ``max_steps`` (when given)
    trains at least one step. Raises ValueError with one line starting with the field's name."""
    if cfg.device is not None:
        check_device(cfg.device)
    if cfg.workers is not None:
        check_workers(cfg.workers)
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None), got {cfg.max_steps}: 0 steps train nothing")


def _check_peer(cfg: TrainConfig) -> None:
    """A bad ``peer`` spec, a loss other than CE for it or an image it does not fit: ValueError ``peer: ...``."""
    from ..training import _peer_spec

    try:
        _peer_spec(cfg)
    except ValueError as e:
        prefix = f"peer {cfg.peer!r}: "
        raise ValueError(f"{'' if str(e).startswith(prefix) else prefix}{e}") from None


def _check_model(cfg: TrainConfig) -> None:
    """Build the configured model once on the CPU, so that an unknown model or invalid ``model_kwargs`` (a wrong
    key, dense=True at stride 1, a receptive field the stride cannot reach) is one line before any data is read."""
    from ..models import create_model

    try:
        create_model(cfg.model, num_classes=cfg.num_classes, **(cfg.model_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise TrainingError(f"--model {cfg.model} --model-kwargs {json.dumps(cfg.model_kwargs or {})}: {e}") from None


def _check_workers_apply(workers_given: int | None, requested: str, chosen: str) -> None:
    """``workers`` read the images of the stream path only: given (not None, not 0) with ``data_path`` memory it
    can never apply (TrainingError); given with ``data_path`` auto that chose the memory path, stderr says it is
    unused (the choice was not the user's; :func:`bagcert.runs._io.check_workers_apply`)."""
    try:
        check_workers_apply(workers_given, requested, chosen)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _check_cifar_size(cfg: TrainConfig) -> None:
    """A CIFAR-10 layout (torchvision's batches, or <root>/train/<the ten classes>) holds 32x32 images that are never
    resized: any other ``image_size`` (or ``random_crop`` / ``resize``) is one line before anything is decoded. The
    training loop checks every dataset's image size again (bagcert.training.check_run_inputs)."""
    from ..data import _find_cifar_batches, _is_cifar_folder, _is_synthetic, _spec_root

    if _is_synthetic(cfg.dataset):
        return
    kind = cfg.dataset.split(":", 1)[0] if ":" in cfg.dataset else ""
    root = _spec_root(cfg.dataset)
    if not (kind == "cifar10" or (kind != "folder" and (_find_cifar_batches(root) or _is_cifar_folder(root, "train")))):
        return
    if cfg.image_size != 32:
        raise TrainingError(f"--image-size {cfg.image_size}: {cfg.dataset} is a CIFAR-10 layout of 32x32 images, which are "
                            "not resized; give --image-size 32 (the loss and the certificate are built for the image size)")
    if cfg.random_crop or cfg.resize is not None:
        raise TrainingError(f"--resize / --random-crop apply to ImageNet-style folders; {cfg.dataset} is a CIFAR-10 layout "
                            "of 32x32 images, which are not resized: leave them out")


def _choose_data_path(cfg: TrainConfig, train_size: int):
    """``(path, reason, training data)``: ``"memory"`` with a decoded :class:`bagcert.data.Dataset`, or ``"stream"``
    with a :mod:`bagcert.streaming` dataset (only its file list is read). ``data_path`` auto decides with
    :func:`bagcert.streaming.choose_data_path` on the decoded size of the in-memory path (every process on this
    machine holds a copy) against the memory budget; a forced path is said as such."""
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def load():
        return load_dataset(cfg.dataset, "train", size=train_size, resize=cfg.resize, seed=cfg.seed,
                            num_classes=cfg.num_classes)

    if cfg.data_path == "memory":
        data = load()
        return ("memory", choose_data_path(data.images.numel(), override="memory", copies=copies)[1], data)
    try:
        augment, refused = stream_augmentation(cfg), None
    except TrainingError as e:  # an augmentation only the in-memory path has: fine unless the stream path is needed
        augment, refused = "none", e
    stream = open_stream(cfg.dataset, "train", size=cfg.image_size, resize=cfg.resize, seed=cfg.seed,
                         num_classes=cfg.num_classes, augment=augment)
    decoded = decoded_size_bytes(len(stream), train_size) if cfg.random_crop else stream.decoded_bytes
    path, reason = choose_data_path(decoded, override=cfg.data_path, copies=copies)
    if path == "memory":
        return path, reason, load()
    if refused is not None:
        raise TrainingError(f"{refused} ({reason})")
    return path, reason, stream


def _held_out(cfg: TrainConfig, path: str, train_data, rank: int):
    """``(training data, held-out data)``: the dataset's test split, or a seeded split of the training images
    where it has none (recorded in the checkpoint metadata); a class-stratified ``train_limit`` draw; at most
    ``eval_images`` held-out images (a seeded draw, in index order)."""
    size = cfg.image_size
    try:
        if path == "memory":
            eval_data = load_dataset(cfg.dataset, "test", size=size, resize=cfg.resize, seed=cfg.seed, num_classes=cfg.num_classes)
        else:
            eval_data = open_stream(cfg.dataset, "test", size=size, resize=cfg.resize, seed=cfg.seed, num_classes=cfg.num_classes,
                                    augment="none")
    except DatasetError as e:  # no test split: a seeded split below, said out loud; any other failure is raised
        if rank == 0:
            print(f"no test split in {cfg.dataset} ({e}); holding out a seeded {cfg.test_fraction:g} of the training images "
                  f"(--test-fraction, --split-seed {cfg.split_seed})", file=sys.stderr)
        eval_data = None
    if eval_data is None or (eval_data.info.get("root") == train_data.info.get("root") and not cfg.dataset.startswith("synthetic")):
        # no split in the dataset: make a seeded one and record it (in the checkpoint metadata too)
        tr, te = seeded_split(len(train_data), cfg.test_fraction, cfg.split_seed)
        full_eval = eval_data if eval_data is not None else train_data
        train_data, eval_data = train_data.subset(tr), full_eval.subset(te)
        train_data.info["seeded_split"] = {
            "seed": cfg.split_seed, "test_fraction": cfg.test_fraction, "num_images": len(tr) + len(te),
            "num_train": len(tr), "num_test": len(te), "rule": "bagcert.data.seeded_split",
        }
    if cfg.train_limit is not None and cfg.train_limit < len(train_data):
        from ..data import stratified_subset  # train_limit: a seeded class-stratified draw, not the first N files

        full = len(train_data)
        train_data = stratified_subset(train_data, cfg.train_limit, cfg.seed)
        if rank == 0:
            counts = ", ".join(f"{c} {k}" for c, k in train_data.info["stratified_subset"]["per_class"].items())
            print(f"--train-limit {cfg.train_limit}: a class-stratified draw (seed {cfg.seed}) of {full} training images: "
                  f"{counts}", file=sys.stderr)
    if len(train_data.classes) != cfg.num_classes:
        raise TrainingError(f"dataset has {len(train_data.classes)} classes but --num-classes is {cfg.num_classes}")
    if cfg.eval_images and eval_data is not None and len(eval_data) > cfg.eval_images:
        index = torch.randperm(len(eval_data), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.eval_images].sort().values
        eval_data = eval_data.subset(index)
    return train_data, eval_data
