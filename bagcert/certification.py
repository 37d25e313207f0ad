"""The BagCert certificate: one forward pass plus integral-image window sums.

Notation (per sample): s[l, c] is the bounded per-location score of class c at location l
(see :mod:`bagcert.aggregation`), T_c = sum_l s[l, c] the class score, y the clean prediction,
R(p) the set of locations whose receptive field meets the patch at position p, and
W_c(p) = sum_{l in R(p)} s[l, c]. The scores of locations outside R(p) cannot change.

Step 1. After any patch at p, the new score difference is
        T'_y - T'_c = (T_y - T_c) - (W_y(p) - W_c(p)) + sum_{l in R(p)} (s'[l, y] - s'[l, c])
                   >= (T_y - T_c) - (W_y(p) - W_c(p)) - spread * |R(p)|
        with spread = high - low of the per-location score interval.
Step 2. y stays the prediction if T'_y - T'_c > 0 for every c != y (strict: ties never certify,
        whichever way the tie rule would break them).
Step 3. So the sample is certified iff, for every position p and class c != y,
        margin_c(p) = (T_y - T_c) - (W_y(p) - W_c(p)) - spread * |R(p)| > 0.
For votes this is exactly the paper's rule sum_{l not in R(p)} (s_y - s_c) > |R(p)|.

W is read off a 2-D cumulative sum, so the cost does not grow with the patch size, and one
forward pass serves every patch size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .aggregation import get_aggregation, predict
from .geometry import Geometry, normalize_image_size, normalize_patch_sizes, parse_patch_size
from .geometry_inference import verify_geometry

__all__ = ["CertResult", "WindowTable", "certify", "certify_logits", "integral_image", "window_margins", "window_table"]



def _fraction(flags: torch.Tensor) -> float:
    """``count / n`` of a bool tensor, counted in integers and divided in double precision (NaN for n = 0)."""
    n = int(flags.numel())
    return int(flags.sum()) / n if n else float("nan")

@dataclass
class CertResult:
    """Per-sample certification outcome for one patch size.

    Attributes:
        prediction: long [N], the defended prediction.
        label: long [N].
        correct: bool [N], prediction == label.
        certified: bool [N], no patch of ``patch_size`` at any position inside the image can
            change the prediction.
        margin: [N] the smallest certificate margin over positions and classes (> 0 iff
            certified); integer-valued for vote aggregations.
        worst_position: long [N, 2], top-left pixel (row, col) of the patch position with the
            smallest margin.
        patch_size: (height, width) in pixels.
        aggregation: name of the aggregation certified.
        position_margins: optional [N, n_rows, n_cols], the margin of every patch position
            (top-left pixel), when requested.
    """

    prediction: torch.Tensor
    label: torch.Tensor
    correct: torch.Tensor
    certified: torch.Tensor
    margin: torch.Tensor
    worst_position: torch.Tensor
    patch_size: tuple[int, int]
    aggregation: str
    position_margins: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.prediction.numel())

    @property
    def clean_accuracy(self) -> float:
        """Correct predictions / samples, the integer count divided in double precision (112 of 200 is 0.56,
        not float32's 0.5600000023841858); NaN without samples."""
        return _fraction(self.correct)

    @property
    def certified_accuracy(self) -> float:
        """Certified and correct / samples, from the integer count in double precision; NaN without samples."""
        return _fraction(self.certified & self.correct)

    @property
    def certified_correct(self) -> torch.Tensor:
        return self.certified & self.correct

    def __repr__(self) -> str:
        ph, pw = self.patch_size
        return (
            f"CertResult(patch={ph}x{pw}, n={self.num_samples}, aggregation={self.aggregation!r}, "
            f"clean={self.clean_accuracy:.4f}, certified={self.certified_accuracy:.4f})"
        )

    @staticmethod
    def concat(results: list["CertResult"]) -> "CertResult":
        first = results[0]
        maps = [r.position_margins for r in results]
        return CertResult(
            prediction=torch.cat([r.prediction for r in results]),
            label=torch.cat([r.label for r in results]),
            correct=torch.cat([r.correct for r in results]),
            certified=torch.cat([r.certified for r in results]),
            margin=torch.cat([r.margin for r in results]),
            worst_position=torch.cat([r.worst_position for r in results]),
            patch_size=first.patch_size,
            aggregation=first.aggregation,
            position_margins=None if any(m is None for m in maps) else torch.cat(maps),
        )


class WindowTable(NamedTuple):
    """The distinct affected windows of one patch size on one image size, on one device.

    ``rows`` [Ur, 2] / ``cols`` [Uc, 2] are the distinct inclusive location ranges (long), ``inv_rows`` [n_rows] /
    ``inv_cols`` [n_cols] map every top-left pixel row / column of the patch to its distinct range, and
    ``first_row`` [Ur] / ``first_col`` [Uc] the first pixel position producing each distinct range. Read-only:
    the tensors are shared by every call with the same key.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    inv_rows: torch.Tensor
    inv_cols: torch.Tensor
    first_row: torch.Tensor
    first_col: torch.Tensor


@functools.lru_cache(maxsize=512)
def window_table(geometry: Geometry, image_size: tuple[int, int], patch_size: tuple[int, int], device: str = "cpu") -> WindowTable:
    """The :class:`WindowTable` of ``patch_size`` (height, width) on ``image_size`` (H, W) pixels, cached.

    Built once per (geometry, image size, patch size, device) on the host and copied to ``device``, so certifying
    a batch does no host-side work and no device synchronisation for it (many positions share one affected range,
    so the certificate evaluates each distinct window once).
    """
    rows, cols = geometry.affected_ranges(image_size, patch_size)
    ur, inv_r = torch.unique(rows, dim=0, return_inverse=True)
    uc, inv_c = torch.unique(cols, dim=0, return_inverse=True)
    first_r, first_c = _first_position(inv_r, ur.shape[0]), _first_position(inv_c, uc.shape[0])
    dev = torch.device(device)
    return WindowTable(*(t.to(dev) for t in (ur, uc, inv_r, inv_c, first_r, first_c)))


def integral_image(scores: torch.Tensor) -> torch.Tensor:
    """Integral image laid out location-major: S[i, j, b, c] = sum of scores[b, c, :i, :j].

    Putting the locations first makes every window lookup a copy of contiguous [B, C] blocks,
    which is several times faster on CPU than gathering along the two innermost dimensions.
    Integer scores accumulate in int32 (exact: counts never exceed h * w), floats in float64.
    """
    B, C, h, w = scores.shape
    acc = torch.float64 if scores.is_floating_point() else torch.int32
    S = torch.zeros(h + 1, w + 1, B, C, dtype=acc, device=scores.device)
    S[1:, 1:] = scores.to(acc).permute(2, 3, 0, 1).cumsum(0).cumsum(1)
    return S


def window_margins(S: torch.Tensor, prediction: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, spread: float) -> torch.Tensor:
    """Worst-case margins for every distinct affected window.

    Args:
        S: integral image from :func:`integral_image`, [h + 1, w + 1, B, C].
        prediction: long [B] the class to protect.
        rows, cols: [Ur, 2] and [Uc, 2] inclusive location ranges (empty encoded as hi = lo - 1).
        spread: high - low of the per-location score interval.

    Returns:
        margins [B, Ur, Uc]: min over c != prediction of margin_c (Step 3 in the module doc).
    """
    h, w, B, C = S.shape[0] - 1, S.shape[1] - 1, S.shape[2], S.shape[3]
    dev = S.device
    r0, r1 = rows[:, 0].to(dev), rows[:, 1].to(dev) + 1
    c0, c1 = cols[:, 0].to(dev), cols[:, 1].to(dev) + 1
    # window sums W_c(p) = S[r1, c1] - S[r0, c1] - S[r1, c0] + S[r0, c0], separably: [Ur, Uc, B, C]
    R = S.index_select(0, r1) - S.index_select(0, r0)
    win = R.index_select(1, c1) - R.index_select(1, c0)
    total = S[h, w]  # T_c, [B, C]
    Ur, Uc = win.shape[0], win.shape[1]
    # |R(p)| as a product of the two axis counts
    size = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    idx = prediction.view(1, 1, B, 1).expand(Ur, Uc, B, 1)
    total_y = total.gather(1, prediction.view(B, 1))  # [B, 1]
    win_y = win.gather(3, idx)  # [Ur, Uc, B, 1]
    if S.is_floating_point():
        size_term, never = (size.to(S.dtype) * spread)[:, :, None, None], float("inf")
    else:  # integer scores have an integer spread (1 for votes): keep the arithmetic exact
        size_term, never = (size.to(S.dtype) * int(spread))[:, :, None, None], torch.iinfo(S.dtype).max
    # Step 3: margin_c(p) = (T_y - T_c) - (W_y(p) - W_c(p)) - spread * |R(p)|
    margin = (total_y - total) - (win_y - win) - size_term
    # the predicted class itself is not a competitor
    margin.scatter_(3, idx, never)
    return margin.amin(dim=3).permute(2, 0, 1)


def _checked_sizes(patch_size, patch_sizes, image_size):
    """``(keys, sizes)``: the result keys as given and the (height, width) of each, all checked against the image."""
    if (patch_size is None) == (patch_sizes is None):
        raise ValueError("give exactly one of patch_size= (one size) or patch_sizes= (a list of sizes)")
    if patch_sizes is None:
        keys, sizes = [patch_size], [parse_patch_size(patch_size)]
    else:
        sizes = normalize_patch_sizes(patch_sizes)
        keys = list(patch_sizes)
    H, W = image_size
    too_big = [f"{ph}x{pw}" for ph, pw in sizes if ph > H or pw > W]
    if too_big:
        raise ValueError(
            f"patch {', '.join(too_big)} is larger than the {H}x{W} image; patch sizes must fit inside the image"
        )
    return [tuple(k) if isinstance(k, list) else k for k in keys], sizes


def certify_logits(
    local_logits: torch.Tensor,
    labels: torch.Tensor | None,
    geometry: Geometry,
    image_size: tuple[int, int],
    patch_size=None,
    *,
    patch_sizes=None,
    aggregation="votes",
    return_position_margins: bool = False,
    check_finite: bool = True,
):
    """Certify from a local-logit map, with no model.

    Args:
        local_logits: floating-point [N, C, h, w] per-location class logits, N >= 1, C >= 2, all finite.
        labels: int64 [N] in [0, C) (any integer dtype is converted to int64), or None (then ``correct`` is
            all False).
        geometry: the model's :class:`~bagcert.geometry.Geometry`; one without a layer chain (``Geometry(rf, stride,
            padding)``) takes its grid from the logit map. This function trusts the geometry: check a model's with
            :func:`bagcert.verify_geometry`.
        image_size: (H, W) in pixels of the images the logits came from.
        patch_size: int or (height, width) (or ``"5"`` / ``"3x7"``) -> returns a :class:`CertResult`.
        patch_sizes: a list of sizes -> returns ``{size as given: CertResult}``. Each size once: ``[5, 5]`` and
            ``[5, (5, 5)]`` are refused. A tuple is a list too: ``patch_sizes=(3, 7)`` means 3x3 and 7x7.
        aggregation: ``"votes"`` (default), ``"majority"`` or ``"clipped"``.
        return_position_margins: also return the margin of every patch position.
        check_finite: refuse logits holding NaN/Inf (ValueError). On an accelerator this check waits for the
            device; with ``check_finite=False`` nothing is refused and a sample with a non-finite logit is never
            certified instead (``certified`` False), so the certificate stays sound.

    Returns:
        A :class:`CertResult`, or ``{(h, w) or int: CertResult}`` when ``patch_sizes`` is given.

    Raises:
        ValueError: not exactly one of ``patch_size`` / ``patch_sizes``; a logit map that is not
            [N, C, h, w] with N >= 1 and C >= 2, holds NaN/Inf or does not match ``geometry`` at ``image_size``;
            labels that are not an integer [N] in [0, C); an empty or duplicated list of patch sizes; a patch
            larger than the image; an unknown aggregation.
        TypeError: ``image_size`` not a (height, width) pair of ints; ``patch_sizes`` not a list; a patch size
            that is not an int or a pair of ints.
    """
    agg = get_aggregation(aggregation)
    if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 4:
        got = tuple(local_logits.shape) if isinstance(local_logits, torch.Tensor) else type(local_logits).__name__
        raise ValueError(f"local logits must be a tensor [N, C, h, w], got {got}")
    if not local_logits.is_floating_point():
        raise ValueError(f"local logits must be floating point (the model's raw logits), got dtype {local_logits.dtype}")
    N, C, h, w = local_logits.shape
    if N == 0:
        raise ValueError(f"local logits hold no samples (shape {tuple(local_logits.shape)}); expected [N, C, h, w] with N >= 1")
    if C < 2:
        raise ValueError(f"need at least 2 classes to certify, got {C}")
    if h == 0 or w == 0:
        raise ValueError(f"local logits have an empty {h}x{w} location grid; expected at least one location")
    finite_checked = bool(check_finite)
    if finite_checked:
        if not torch.isfinite(local_logits).all():
            raise ValueError("local logits contain NaN or Inf; cannot certify")
    else:  # no host synchronisation: a sample with a non-finite logit is simply never certified
        finite = torch.isfinite(local_logits).flatten(1).all(dim=1)
    H, W = normalize_image_size(image_size)
    if geometry.knows_grid(H, W):
        if geometry.grid_size(H, W) != (h, w):
            raise ValueError(
                f"local-logit map is {h}x{w} but the geometry gives {geometry.grid_size(H, W)} locations "
                f"for a {H}x{W} image: logits and image size do not belong together"
            )
    else:  # a geometry without a layer chain takes its grid from the logit map
        geometry = geometry.at_grid((H, W), (h, w))
    keys, sizes = _checked_sizes(patch_size, patch_sizes, (H, W))
    labels = _check_labels(labels, N, C, local_logits.device)

    scores = agg.local_scores(local_logits.float() if agg.exact_integer else local_logits)
    prediction = predict(scores.sum(dim=(2, 3)))
    correct = prediction == labels if labels is not None else torch.zeros(N, dtype=torch.bool, device=prediction.device)
    label_out = labels if labels is not None else torch.full((N,), -1, dtype=torch.long, device=prediction.device)

    S = integral_image(scores)  # shared by every patch size
    results = {}
    for key, (ph, pw) in zip(keys, sizes):
        table = window_table(geometry, (H, W), (ph, pw), str(S.device))
        ur, uc = table.rows, table.cols
        m = window_margins(S, prediction, ur, uc, agg.spread)  # [N, Ur, Uc]
        flat = m.reshape(N, -1)
        margin, arg = flat.min(dim=1)
        # Floats: demand a margin clearly above rounding noise of the float64 sums.
        if agg.exact_integer:
            certified = margin > 0
        else:
            tol = 1e-9 * max(1.0, h * w * agg.spread)
            certified = margin > tol
        if not finite_checked:
            certified = certified & finite
        # map the worst distinct window back to the first pixel position that produces it
        wr = table.first_row[arg // uc.shape[0]]
        wc = table.first_col[arg % uc.shape[0]]
        pos_maps = None
        if return_position_margins:
            pos_maps = m.index_select(1, table.inv_rows).index_select(2, table.inv_cols)
        res = CertResult(
            prediction=prediction,
            label=label_out,
            correct=correct,
            certified=certified,
            margin=margin,
            worst_position=torch.stack([wr, wc], dim=1),
            patch_size=(ph, pw),
            aggregation=agg.name,
            position_margins=pos_maps,
        )
        results[key] = res
    if patch_sizes is None:
        return next(iter(results.values()))
    return results


def _first_position(inverse: torch.Tensor, n_unique: int) -> torch.Tensor:
    pos = torch.arange(inverse.numel(), dtype=torch.long)
    first = torch.full((n_unique,), inverse.numel(), dtype=torch.long)
    return first.scatter_reduce(0, inverse.cpu(), pos, reduce="amin")


def _check_labels(labels, N, C, device):
    """Labels as int64 [N] on ``device`` (or None); with ``C`` given, also checked to lie in [0, C)."""
    if labels is None:
        return None
    given = labels
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"labels must be an integer tensor [N] of class indices, got {type(given).__name__}") from None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (int64 [N]), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != N:
        hint = "; flatten [N, 1] labels with labels.view(-1)" if labels.dim() == 2 and labels.shape == (N, 1) else ""
        raise ValueError(f"labels must have shape [N] = [{N}] (one class index per image), got shape {list(labels.shape)}{hint}")
    # checked where the labels are (usually the host) before the copy, so an accelerator is not waited for
    if N and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    if N and C is not None and labels.max() >= C:
        bad = labels[(labels < 0) | (labels >= C)][:5].tolist()
        raise ValueError(f"labels must lie in [0, {C}) for a {C}-class model; found {bad}")
    return labels.to(device=device, dtype=torch.long, non_blocking=True)


@torch.no_grad()
def certify(
    model,
    images: torch.Tensor,
    labels=None,
    patch_size=None,
    *,
    patch_sizes=None,
    aggregation=None,
    batch_size: int | None = None,
    return_position_margins: bool = False,
    precision: str = "fp32",
):
    """Certify a BagNet-style model's predictions against patches, from ONE forward pass.

    The forward pass runs the model's inference-optimised form (:mod:`bagcert.inference`: batch norm folded into
    the convolutions, a dense model without dilated convolutions, channels_last on the CPU) in chunks of a fixed
    number of images (:func:`bagcert.inference.chunk_size`), so each image's logits, and so its prediction and
    certificate, are bit-identical whatever ``batch_size`` or the other images passed with it.

    Args:
        model: a bagcert model (has ``local_logits`` and ``geometry``), in eval mode.
        images: floating-point [N, 3, H, W] in [0, 1], N >= 1, unnormalised (the model normalises internally).
            float64, float16 and bfloat16 images are converted to the model's weight dtype (float32) by
            ``model.local_logits``: float64 is rounded to float32 (the result is the float32 path's), half
            precision is widened exactly. uint8 images are refused (convert with ``x.float() / 255``).
        labels: int64 [N] class indices in [0, num_classes) (any integer dtype is converted), or None.
        patch_size: int or (height, width) -> returns a :class:`CertResult`.
        patch_sizes: list of sizes -> returns ``{size: CertResult}`` from the same forward pass; each size
            once (see :func:`bagcert.geometry.normalize_patch_sizes`).
        aggregation: defaults to the model's own (``model.aggregation``, ``"votes"``).
        batch_size: certify this many images at a time (an int >= 1; None: as many as fit a memory budget of
            about 512 MiB for the certificate's tensors). Results do not depend on it.
        precision: ``"fp32"`` (default) or ``"bf16"``: evaluate the model under bf16 autocast (faster on CPUs with
            AMX / avx512_bf16 and on GPUs). The prediction and certificate are then those of the model as
            evaluated in bf16: sound for that model, and possibly different from the float32 model's.

    Raises:
        RuntimeError: the model is in training mode.
        GeometryError (a ValueError): the model's declared ``geometry`` does not cover its true receptive field,
            or the true one cannot be established (:func:`bagcert.verify_geometry`: built-in registry models are
            trusted, any other model is checked once per image size; a larger declared geometry only warns).
        TypeError: ``model`` is not a bagcert model; ``patch_sizes`` is not a list; ``batch_size`` not an int.
        ValueError: an unknown ``precision`` (or bf16 on a device without it); images that are not a floating-point [N, 3, H, W] batch with N >= 1 (the model's
            :class:`~bagcert.models.InputError`, a ValueError, also reports values outside [0, 1]); labels that
            are not an integer [N] in [0, num_classes); ``batch_size < 1``; an empty or duplicated list of patch
            sizes; a patch larger than the image; an unknown aggregation. All are raised before the forward pass.
    """
    if getattr(model, "training", False):
        raise RuntimeError(
            "model is in training mode (batch-norm statistics would depend on the batch); call model.eval() first"
        )
    if not hasattr(model, "local_logits") or not hasattr(model, "geometry"):
        raise TypeError("certify needs a bagcert model with .local_logits() and .geometry")
    if (patch_size is None) == (patch_sizes is None):
        raise ValueError("give exactly one of patch_size= (one size) or patch_sizes= (a list of sizes)")
    aggregation = get_aggregation(aggregation or getattr(model, "aggregation", "votes")).name
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [0, 1], got {got}")
    if not images.is_floating_point():
        hint = "; convert uint8 images with x.float() / 255" if images.dtype == torch.uint8 else ""
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}{hint}")
    N = images.shape[0]
    if N == 0:
        raise ValueError(f"no images to certify (batch shape {list(images.shape)}); expected [N, 3, H, W] with N >= 1")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise TypeError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (images per forward pass), got {batch_size}")
    from .inference import certify_batch_size, check_precision, chunk_size, evaluate_local_logits, inference_copy

    check_precision(precision, images.device)
    image_size = tuple(images.shape[-2:])
    _checked_sizes(patch_size, patch_sizes, image_size)
    # the geometry the certificate uses: checked against the model's computation once per (model, image size)
    geometry = verify_geometry(model, image_size)
    fast = inference_copy(model, precision)
    chunk = chunk_size(model, image_size)
    bs = batch_size or certify_batch_size(model, image_size, chunk)
    # validate labels before spending a forward pass
    num_classes = getattr(model, "num_classes", None)
    if labels is not None:
        labels = _check_labels(labels, N, num_classes, "cpu")
    chunks = []
    for start in range(0, N, bs):
        x = images[start : start + bs]
        logits = evaluate_local_logits(fast, x, precision=precision, chunk=chunk)
        y = None if labels is None else labels[start : start + bs]
        chunks.append(
            certify_logits(
                logits,
                y,
                geometry,
                image_size,
                patch_size,
                patch_sizes=patch_sizes,
                aggregation=aggregation,
                return_position_margins=return_position_margins,
            )
        )
    if patch_sizes is None:
        return CertResult.concat(chunks)
    return {k: CertResult.concat([c[k] for c in chunks]) for k in chunks[0]}
