"""Batch certification of a dataset, with timing and optional torch.distributed sharding."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .certification import CertResult, certify_logits
from .data import Dataset
from .geometry import parse_patch_size

__all__ = ["certify_dataset", "size_key", "vote_statistics"]


def size_key(size) -> str:
    """Canonical text for a patch size: '5' for squares, '3x7' for rectangles."""
    h, w = parse_patch_size(size)
    return str(h) if h == w else f"{h}x{w}"


@torch.no_grad()
def check_patch_sizes(patch_sizes, image_hw) -> tuple[list[str], list[tuple[int, int]]]:
    """``(keys, sizes)`` of the requested patch sizes; duplicates and patches larger than the image raise."""
    keys = [size_key(p) for p in patch_sizes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate patch sizes in {list(patch_sizes)}")
    sizes = [parse_patch_size(p) for p in patch_sizes]
    H, W = image_hw
    for (ph, pw) in sizes:
        if ph > H or pw > W:
            raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} images")
    return keys, sizes


def certify_dataset(
    model,
    data: Dataset,
    patch_sizes,
    *,
    batch_size: int = 250,
    device="cpu",
    aggregation=None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
):
    """Certify every image of ``data`` for every patch size from one forward pass per batch.

    Under torch.distributed (``world > 1``) rank r certifies images r, r + world, ...; per-sample
    results are gathered so every rank returns the full, ordered result.

    Returns ``(results, timing)`` with ``results = {size_key: CertResult}`` in dataset order and
    ``timing = {"forward_s", "certify_s", "total_s", "images"}`` (this rank's times).
    """
    if model.training:
        raise RuntimeError("model is in training mode; call model.eval() before certifying")
    H, W = data.images.shape[-2:]
    keys, sizes = check_patch_sizes(patch_sizes, (H, W))
    agg = aggregation or model.aggregation

    def certify_batch(x, y):
        t = time.perf_counter()
        z = model.local_logits(x)
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        res = certify_logits(z, y, model.geometry, (H, W), patch_sizes=sizes, aggregation=agg)
        return dict(zip(keys, res.values())), t_fwd, time.perf_counter() - t

    return certify_batches(data, keys, certify_batch, batch_size=batch_size, device=device, progress=progress,
                           desc="certify", rank=rank, world=world)


def certify_batches(data: Dataset, keys, certify_batch, *, batch_size: int = 250, device="cpu", progress: bool = False,
                    desc: str = "certify", rank: int = 0, world: int = 1):
    """The batch loop shared by every certifier over a dataset.

    ``certify_batch(x, y) -> ({size_key: CertResult}, forward_s, certify_s)`` certifies one batch (float
    images in [0, 1] on ``device``). Rank r takes images r, r + world, ...; per-sample results are
    gathered so that every rank returns the full result in dataset order. Returns ``(results, timing)``
    as :func:`certify_dataset`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = list(keys)
    idx = torch.arange(rank, len(data), world)
    chunks: list[dict] = []
    t_fwd = t_cert = 0.0
    it = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(len(idx) + batch_size - 1) // batch_size, unit="batch", desc=desc, mininterval=1.0)
    t0 = time.perf_counter()
    for start in it:
        b = idx[start : start + batch_size]
        x = data.float_images(b).to(device)
        y = data.labels[b].to(device)
        res, f, c = certify_batch(x, y)
        t_fwd, t_cert = t_fwd + f, t_cert + c
        chunks.append({k: _to_cpu(res[k]) for k in keys})
    total = time.perf_counter() - t0
    results = {k: CertResult.concat([c[k] for c in chunks]) for k in keys} if chunks else {}
    if world > 1:
        results = _gather(results, keys, len(data), rank, world)
    return results, {"forward_s": t_fwd, "certify_s": t_cert, "total_s": total, "images": int(len(idx))}


def _to_cpu(r: CertResult) -> CertResult:
    return CertResult(
        r.prediction.cpu(), r.label.cpu(), r.correct.cpu(), r.certified.cpu(), r.margin.cpu(), r.worst_position.cpu(), r.patch_size, r.aggregation
    )


def _gather(results, keys, n, rank, world):
    """All-gather per-sample results from every rank and restore dataset order."""
    parts = [None] * world
    payload = {k: {f: getattr(results[k], f) for f in ("prediction", "label", "correct", "certified", "margin", "worst_position")} for k in results}
    dist.all_gather_object(parts, payload)
    out = {}
    for k in keys:
        fields = {}
        for f in ("prediction", "label", "correct", "certified", "margin", "worst_position"):
            first = parts[0][k][f]
            full = torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype)
            for r in range(world):
                if k in parts[r]:
                    full[torch.arange(r, n, world)] = parts[r][k][f]
            fields[f] = full
        any_res = next(iter(results.values())) if results else None
        out[k] = CertResult(
            **fields,
            patch_size=parse_patch_size(k),
            aggregation=any_res.aggregation if any_res else "votes",
        )
    return out


def vote_statistics(votes: torch.Tensor, labels: torch.Tensor) -> dict:
    """How the locations of a vote model vote, summed over a batch: the diagnosis behind a low certificate.

    ``votes``: binary votes [B, C, h, w] (``Aggregation.local_scores`` of ``"votes"``); ``labels``: [B].
    Returns fractions of all B * h * w locations: ``abstain`` (no class), ``label_only``,
    ``label_and_other`` (the label and at least one other class), ``wrong_only`` (only other classes); and
    per image, as fractions of the h * w locations: ``label_votes`` (mean votes for the label) and
    ``margin`` (mean of label votes minus the most votes of any other class). The four location fractions
    sum to 1.
    """
    if votes.dim() != 4:
        raise ValueError(f"votes must be [B, C, h, w], got shape {tuple(votes.shape)}")
    if labels.shape != (votes.shape[0],):
        raise ValueError(f"labels must be [B] = [{votes.shape[0]}], got shape {tuple(labels.shape)}")
    if votes.dtype.is_floating_point or bool(((votes != 0) & (votes != 1)).any()):
        raise ValueError("votes must be 0/1 integers (threshold the logits first, e.g. Aggregation.local_scores)")
    if bool(((labels < 0) | (labels >= votes.shape[1])).any()):
        raise ValueError(f"labels must lie in [0, {votes.shape[1]}), got {labels.min().item()}..{labels.max().item()}")
    b, c, h, w = votes.shape
    v = votes.to(torch.int64)
    onehot = torch.nn.functional.one_hot(labels.long(), c).to(torch.bool)
    label_vote = v[torch.arange(b), labels.long()]  # [B, h, w]
    other = v.masked_fill(onehot[:, :, None, None], 0)
    any_other = other.sum(dim=1) > 0
    n_loc = b * h * w
    label_counts = label_vote.sum(dim=(1, 2)).double()
    best_other = other.sum(dim=(2, 3)).max(dim=1).values.double()
    return {
        "images": b,
        "locations_per_image": h * w,
        "abstain": float((v.sum(dim=1) == 0).sum()) / n_loc,
        "label_only": float(((label_vote == 1) & ~any_other).sum()) / n_loc,
        "label_and_other": float(((label_vote == 1) & any_other).sum()) / n_loc,
        "wrong_only": float(((label_vote == 0) & any_other).sum()) / n_loc,
        "label_votes": float(label_counts.mean()) / (h * w),
        "margin": float((label_counts - best_other).mean()) / (h * w),
    }
