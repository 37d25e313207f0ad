"""The training data as the batches of a step, with their augmentation: :class:`MemoryBatches` (the uint8 tensor in
memory, whole-batch augmentation) or :class:`StreamBatches` (:mod:`bagcert.streaming` loaders with worker
processes, for sets that do not fit in memory), and :func:`stream_augmentation`.

The data order of epoch e is ``randperm`` from a generator seeded with (seed, e), and the augmentation of step k
from one seeded with (seed, e, k), drawn for the global batch: each image gets the same draw with any number of
processes or micro-batches (``grad_accum``).
"""

from __future__ import annotations

import os

import torch

from ..data import Dataset, augment_batch
from .config import TrainConfig
from .errors import TrainingError

__all__ = ["MemoryBatches", "StreamBatches", "stream_augmentation"]


def _seeded(*parts) -> torch.Generator:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return torch.Generator().manual_seed(s)


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
        from ..streaming import make_loader

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


def _resolve_workers(cfg: TrainConfig) -> int:
    """Loader processes of the stream path: ``cfg.workers``, or min(8, CPUs) when None."""
    return cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)


def _training_batches(cfg: TrainConfig, train_data, rank: int, world: int, device, peer):
    """MemoryBatches for a Dataset, StreamBatches for a bagcert.streaming dataset (whose augmentation must be cfg's)."""
    from ..streaming import StreamDataset

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
