"""Batch certification of a dataset (held in memory or streamed), with timing and optional torch.distributed sharding."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .certification import CertResult, certify_logits
from .geometry import parse_patch_size
from .geometry_inference import verify_geometry

__all__ = ["certify_dataset", "certify_batches", "StreamSource", "size_key", "vote_statistics"]


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
    data,
    patch_sizes,
    *,
    batch_size: int = 250,
    device="cpu",
    aggregation=None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    precision: str = "fp32",
):
    """Certify every image of ``data`` for every patch size from one forward pass per batch.

    The forward pass is :func:`bagcert.inference.evaluate_local_logits` (the model's inference-optimised form in
    fixed-size chunks), as in :func:`bagcert.certify`: every image's result is bit-identical whatever
    ``batch_size``, ``world`` or data path. ``precision``: ``"fp32"`` or ``"bf16"`` (see :func:`bagcert.certify`).

    ``data``: a :class:`bagcert.data.Dataset` (uint8 images held in memory) or a :class:`StreamSource`
    (images decoded batch by batch by DataLoader workers, never all held). Under torch.distributed
    (``world > 1``) each rank certifies a disjoint shard (in memory: images r, r + world, ...; streamed:
    its share of every global batch, :class:`bagcert.streaming.ShardedBatchSampler`); per-sample results
    are gathered so every rank returns the full, ordered result.

    On an accelerator the images are the toolkit's own uint8 data, so the model's input check is skipped
    (``model.check_inputs``, restored afterwards) and the certificate is computed with
    ``check_finite=False`` (a sample with a non-finite logit is never certified): nothing waits for the
    device per batch. On the CPU both checks run as in :func:`bagcert.certify`.

    Returns ``(results, timing)`` with ``results = {size_key: CertResult}`` in dataset order (tensors on
    the CPU) and ``timing = {"forward_s", "certify_s", "total_s", "images"}`` (this rank's times, seconds).
    Raises ``RuntimeError`` for a model in training mode, ``ValueError`` for duplicate or too-large patch sizes.
    """
    if model.training:
        raise RuntimeError("model is in training mode; call model.eval() before certifying")
    H, W = data.images.shape[-2:]
    keys, sizes = check_patch_sizes(patch_sizes, (H, W))
    agg = aggregation or model.aggregation
    geometry = verify_geometry(model, (H, W))  # checked once per (model, image size); registry models are trusted
    accel = torch.device(device).type != "cpu"
    timer = _Timer(device)
    from .inference import check_precision, chunk_size, evaluate_local_logits, inference_copy

    check_precision(precision, device)
    chunk = chunk_size(model, (H, W))

    def certify_batch(x, y):
        t = timer.start()
        z = evaluate_local_logits(fast, x, precision=precision, chunk=chunk)
        t = timer.lap(t, "forward")
        res = certify_logits(z, y, geometry, (H, W), patch_sizes=sizes, aggregation=agg, check_finite=not accel)
        timer.lap(t, "certify")
        return dict(zip(keys, res.values())), 0.0, 0.0

    check = getattr(model, "check_inputs", None)
    if accel and check is not None:
        model.check_inputs = False  # our own uint8 data, scaled to [0, 1]: the per-batch host check would wait for the device
    try:
        fast = inference_copy(model, precision)
        results, timing = certify_batches(data, keys, certify_batch, batch_size=batch_size, device=device, progress=progress,
                                          desc="certify", rank=rank, world=world)
    finally:
        if accel and check is not None:
            model.check_inputs = check
    timing.update(forward_s=timer.total("forward"), certify_s=timer.total("certify"))
    return results, timing


class _Timer:
    """Sums the forward and certificate times of the batches. On the CPU: ``time.perf_counter``. On CUDA:
    pairs of CUDA events, read once after the loop (the loop's final copy waits for the device), so no
    batch waits for the device to be timed."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.sums = {"forward": 0.0, "certify": 0.0}
        self.events = {"forward": [], "certify": []}

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def lap(self, since, name):
        now = self.start()
        if self.cuda:
            self.events[name].append((since, now))
        else:
            self.sums[name] += now - since
        return now

    def total(self, name) -> float:
        if self.cuda and self.events[name]:
            self.events[name][-1][1].synchronize()
            self.sums[name] += sum(a.elapsed_time(b) for a, b in self.events[name]) / 1000.0
            self.events[name] = []
        return self.sums[name]


class StreamSource:
    """A :mod:`bagcert.streaming` dataset as input of :func:`certify_dataset` / :func:`certify_batches`:
    its images are decoded batch by batch (``make_loader(..., train=False)``, ``workers`` worker
    processes) and dropped once certified, so memory does not grow with the number of images.

    Attributes as the certifiers read them from a :class:`bagcert.data.Dataset`: ``labels`` (int64 [N]),
    ``images`` (a shape-only tensor on the ``meta`` device, uint8 [N, 3, H, W]: no pixels are held),
    ``dataset`` (the stream). ``len(source)`` is N. Raises ``TypeError`` for anything but a
    ``bagcert.streaming.StreamDataset`` and ``ValueError`` for ``workers < 0``.
    """

    def __init__(self, dataset, workers: int = 0):
        from .streaming import StreamDataset

        if not isinstance(dataset, StreamDataset):
            raise TypeError(f"StreamSource takes a bagcert.streaming dataset, got {type(dataset).__name__}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.dataset, self.workers = dataset, int(workers)
        self.labels = dataset.labels
        self.images = torch.empty((len(dataset),) + tuple(dataset.image_shape), dtype=torch.uint8, device="meta")

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(self, batch_size: int, rank: int = 0, world: int = 1, pin_memory: bool = False):
        """The ``DataLoader`` of rank ``rank``'s shard, in dataset order: batches ``(uint8 [b, 3, H, W],
        int64 [b] labels, int64 [b] positions in the dataset)`` with ``b <= batch_size``."""
        from .streaming import make_loader

        return make_loader(self.dataset, batch_size * world, train=False, rank=rank, world=world, workers=self.workers,
                           pin_memory=pin_memory)


def certify_batches(data, keys, certify_batch, *, batch_size: int = 250, device="cpu", progress: bool = False,
                    desc: str = "certify", rank: int = 0, world: int = 1):
    """The batch loop shared by every certifier over a dataset.

    ``data``: a :class:`bagcert.data.Dataset` or a :class:`StreamSource`. ``certify_batch(x, y) ->
    ({size_key: CertResult}, forward_s, certify_s)`` certifies one batch (float images in [0, 1] on
    ``device``, int64 labels on the CPU). In memory rank r takes images r, r + world, ...; streamed, its
    share of each global batch; per-sample results are gathered so that every rank returns the full result
    in dataset order. Only the per-sample results are kept, never the images. On CUDA the loop never waits
    for the device per batch: the results stay there until the end, and the clock is read after one
    ``torch.cuda.synchronize()`` at each end of the loop. Returns ``(results, timing)`` as
    :func:`certify_dataset`. Raises ``ValueError`` for ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = list(keys)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if isinstance(data, StreamSource):
        loader = data.loader(batch_size, rank, world, pin_memory=cuda)
        batches, total = iter(loader), sum(len(b) for b in loader.batch_sampler.index_batches())
    else:
        idx = torch.arange(rank, len(data), world)
        starts = range(0, len(idx), batch_size)
        batches = ((data.images[b], data.labels[b], b) for b in (idx[s : s + batch_size] for s in starts))
        total = len(idx)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc=desc, mininterval=1.0)  # images of this rank
    chunks: list[dict] = []
    positions: list[torch.Tensor] = []
    t_fwd = t_cert = 0.0
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for xb, yb, ib in batches:
        if dev.type == "cpu":
            x = xb.float().div_(255.0)
        else:
            x = xb.to(dev, non_blocking=True).float().div_(255.0)
        res, f, c = certify_batch(x, yb)
        t_fwd, t_cert = t_fwd + f, t_cert + c
        chunks.append({k: _rows(res[k]) for k in keys})  # the small per-sample rows only (on the device until the end)
        positions.append(ib)
        if bar is not None:
            bar.update(int(ib.numel()))
    if cuda:
        torch.cuda.synchronize(dev)
    total_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    results = {k: _rows(CertResult.concat([c[k] for c in chunks]), "cpu") for k in keys} if chunks else {}
    index = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    n_local = int(index.numel())
    if world > 1:
        results = _gather(results, index, keys, len(data), world)
    elif n_local and not torch.equal(index, torch.arange(len(data))):
        results = _place(results, index, len(data))
    return results, {"forward_s": t_fwd, "certify_s": t_cert, "total_s": total_s, "images": n_local}


_FIELDS = ("prediction", "label", "correct", "certified", "margin", "worst_position")


def _rows(r: CertResult, device=None) -> CertResult:
    """The per-sample fields of ``r`` (no per-position maps), moved to ``device`` when given."""
    return CertResult(*(getattr(r, f) if device is None else getattr(r, f).to(device) for f in _FIELDS), r.patch_size, r.aggregation)


def _place(results, index, n):
    """Results of the samples at positions ``index`` put in dataset order (``n`` samples, each once)."""
    out = {}
    for k, r in results.items():
        fields = {}
        for f in _FIELDS:
            v = getattr(r, f)
            full = torch.empty((n,) + tuple(v.shape[1:]), dtype=v.dtype)
            full[index] = v
            fields[f] = full
        out[k] = CertResult(**fields, patch_size=r.patch_size, aggregation=r.aggregation)
    return out


def _gather(results, index, keys, n, world):
    """All-gather the per-sample results of every rank (with their dataset positions) and restore dataset order."""
    parts = [None] * world
    payload = {"index": index, "results": {k: {f: getattr(results[k], f) for f in _FIELDS} for k in results},
               "aggregation": next(iter(results.values())).aggregation if results else None}
    dist.all_gather_object(parts, payload)
    aggregation = next((p["aggregation"] for p in parts if p["aggregation"] is not None), "votes")
    out = {}
    for k in keys:
        donors = [p for p in parts if k in p["results"]]
        fields = {}
        for f in _FIELDS:
            first = donors[0]["results"][k][f]
            full = torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype)
            for p in donors:
                full[p["index"]] = p["results"][k][f]
            fields[f] = full
        out[k] = CertResult(**fields, patch_size=parse_patch_size(k), aggregation=aggregation)
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
