"""Held-out evaluation during training: :func:`evaluate` (clean and certified accuracy) and :class:`Evaluator`
(that, or a peer classifier's accuracy on its transform; the vote figure for TensorBoard)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..certification import certify_logits
from ..data import Dataset
from .batches import _seeded

__all__ = ["evaluate", "Evaluator"]


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
    from ..streaming import make_loader

    for x, y, _ in make_loader(data, batch_size * world, train=False, rank=rank, world=world, workers=workers, pin_memory=False):
        yield x, y
