"""Region of Importance (RoI), Region of Attack (RoA) and neutralisation.

After Chattopadhyay et al. (arXiv 2011.10794; see ``docs/reference.md`` section 8): the RoI is
where the model looks, the RoA where an attacker changes the image; blanking the part of the RoA
that is not important (RoA minus RoI) is a post-hoc defense. The paper's exact procedure is not
available; this module implements the concrete version below.

RoI maps (float [B, H, W], larger = more important)
    * :func:`roi_from_local_logits` -- BagNet-style models: the local-logit map [h, w] of the
      predicted (or given) class, brought to pixels with the model's geometry: location (i, j)
      sees the pixel box ``model.geometry.pixel_box(i, j, image_size)``, and each pixel gets the
      **mean** (default) or the **max** of the logits of all locations whose box contains it
      (:func:`upsample_local_map`). Pixels that no location sees (e.g. the last 7 columns of a
      224 px BagNet) cannot influence the model: they get the smallest value of the image's map.
    * :func:`occlusion_roi` -- any model: a ``window`` x ``window`` square filled with ``fill``
      (0.5 grey by default) slides with ``stride`` (the last position is always added, so every
      pixel is covered); the importance of a position is the drop of the target class's logit,
      ``logit(x) - logit(x occluded)``, and each pixel gets the mean drop over the positions whose
      window covers it.

RoA maps (float [B, H, W])
    * :func:`roa_from_perturbation` -- ``|x_adv - x|`` summed over channels (needs the clean image:
      an analysis / oracle tool);
    * :func:`roa_from_gradient` -- ``|d CE(logits(x), target) / d x|`` summed over channels (needs
      only the image at hand: usable as a defense);
    both box-filtered (:func:`box_filter`: mean over a ``box`` x ``box`` window, odd ``box``, the
    window cut at the border and the mean taken over the pixels inside).

Binarisation (:func:`binarize_top_q`)
    keeps exactly ``k = floor(q N / 100 + 1/2)`` of the N pixels of each map (q in percent, the
    count rounded half up), the k largest; ties are broken by position, the pixel with the smaller
    row-major index (row * W + col) first. So the kept fraction is exact whatever the ties.
    RoA masks in :func:`evaluate_neutralization` use ``positive_only=True``: pixels the attack did
    not change at all (value 0) are never part of the RoA, so a 5x5 patch gives at most the
    box-filtered 7x7 region even at large q.

Neutralisation (:func:`neutralize`)
    pixels in ``RoA & ~RoI`` are replaced by ``fill``: ``"zero"`` (0), ``"mean"`` (the image's
    per-channel mean over all its pixels), ``"blur"`` (the same pixel of a Gaussian-blurred copy)
    or a number in [0, 1]; every other pixel is left exactly as it was.

Overlap (:func:`iou`, :func:`iou_across_q`): intersection over union of two boolean masks, per
image, 1.0 when both are empty; reported values are the mean of the per-image IoUs (not one IoU
pooled over the pixels of all images).

Labels: the RoI and the gradient RoA use the model's *predicted* class (of the image at hand), never
the true label, which a defender does not have; the true label is used only by the attack and to
score accuracy.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..defense.common import as_float_images, check_labels, eval_mode, logits_fn_of, predict_fn_of

__all__ = [
    "location_pixel_membership",
    "upsample_local_map",
    "roi_from_local_logits",
    "occlusion_roi",
    "box_filter",
    "roa_from_perturbation",
    "roa_from_gradient",
    "binarize_top_q",
    "neutralize",
    "iou",
    "iou_across_q",
    "evaluate_neutralization",
    "roi_method_title",
    "iou_figure",
    "roi_heatmap_figure",
]


# --- RoI --------------------------------------------------------------------------------------
def location_pixel_membership(geometry, grid_size, image_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``rows`` [h, H] and ``cols`` [w, W]: ``rows[i, p]`` is True iff pixel row p lies in
    the pixel box of location row i (from ``geometry.pixel_box``, clipped to the image); same
    for columns. Location (i, j) sees pixel (p, q) iff ``rows[i, p] and cols[j, q]``."""
    gh, gw = (int(v) for v in grid_size)
    H, W = (int(v) for v in image_size)
    rows = torch.zeros(gh, H, dtype=torch.bool)
    cols = torch.zeros(gw, W, dtype=torch.bool)
    for i in range(gh):
        top, _, bottom, _ = geometry.pixel_box(i, 0, (H, W))
        if bottom >= top:
            rows[i, top : bottom + 1] = True
    for j in range(gw):
        _, left, _, right = geometry.pixel_box(0, j, (H, W))
        if right >= left:
            cols[j, left : right + 1] = True
    return rows, cols


def upsample_local_map(local_map: torch.Tensor, geometry, image_size, reduce: str = "mean") -> torch.Tensor:
    """Pixel map [B, H, W] from a location map [B, h, w] (see the module docstring).

    ``reduce="mean"``: pixel (p, q) gets the mean of ``local_map[i, j]`` over the locations whose
    box contains it; ``"max"``: their maximum. Pixels seen by no location get the image's smallest
    covered value.
    """
    if local_map.dim() != 3:
        raise ValueError(f"local_map must be [B, h, w], got {tuple(local_map.shape)}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    lm = local_map.detach().float()
    if getattr(geometry, "layers", None):
        expected = tuple(geometry.grid_size(*(int(v) for v in image_size)))
        if tuple(lm.shape[-2:]) != expected:
            raise ValueError(f"local_map grid {tuple(lm.shape[-2:])} does not match the geometry's grid {expected} for a {tuple(image_size)} image")
    rows, cols = location_pixel_membership(geometry, lm.shape[-2:], image_size)
    rows, cols = rows.to(lm.device), cols.to(lm.device)
    covered = rows.any(0).view(-1, 1) & cols.any(0).view(1, -1)  # [H, W]
    if reduce == "mean":
        total = torch.einsum("ip,bij,jq->bpq", rows.float(), lm, cols.float())
        count = rows.sum(0).float().view(-1, 1) * cols.sum(0).float().view(1, -1)
        out = total / count.clamp_min(1.0)
    else:
        neg = torch.tensor(float("-inf"), device=lm.device)
        # separable max: first over the columns j that see pixel column q, then over the rows i
        m1 = torch.where(cols.view(1, 1, *cols.shape), lm.unsqueeze(-1), neg).amax(dim=2)  # [B, h, W]
        out = torch.where(rows.view(1, *rows.shape, 1), m1.unsqueeze(2), neg).amax(dim=1)  # [B, H, W]
    if not bool(covered.all()):
        if not bool(covered.any()):
            raise ValueError("no pixel is seen by any location: geometry and image size do not match")
        low = torch.where(covered, out, torch.full_like(out, float("inf"))).flatten(1).amin(dim=1)
        out = torch.where(covered, out, low.view(-1, 1, 1))
    return out


def _model_prediction(model, local: torch.Tensor) -> torch.Tensor:
    from ..aggregation import get_aggregation

    agg = getattr(model, "aggregation", None)
    if isinstance(agg, str):
        return get_aggregation(agg).class_scores(local).argmax(dim=1)
    return local.mean(dim=(2, 3)).argmax(dim=1)


def roi_from_local_logits(model, x: torch.Tensor, target=None, reduce: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """RoI of a BagNet-style model (``local_logits`` + ``geometry``): ``(maps [B, H, W], target [B])``.

    ``target`` defaults to the model's prediction (the argmax of its aggregated class scores, ties
    to the lower class index).
    """
    if not hasattr(model, "local_logits") or getattr(model, "geometry", None) is None:
        raise TypeError("roi_from_local_logits needs a model with local_logits(x) and a geometry; use occlusion_roi for other models")
    x = as_float_images(x)
    with torch.no_grad(), eval_mode(model):  # no BatchNorm batch statistics, no update of running stats
        local = model.local_logits(x)
    target = _model_prediction(model, local) if target is None else check_labels(target, x.shape[0], local.shape[1]).to(local.device)
    chosen = local.gather(1, target.view(-1, 1, 1, 1).expand(-1, 1, *local.shape[-2:])).squeeze(1)
    return upsample_local_map(chosen, model.geometry, x.shape[-2:], reduce), target


def _window_starts(n: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)  # the last position, so that every pixel is covered
    return starts


def occlusion_roi(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target=None,
    window: int = 8,
    stride: int = 4,
    fill: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion-sensitivity RoI for any model: ``(maps [B, H, W], target [B])``.

    ``target`` defaults to the argmax of ``logits_fn(x)``. One forward pass of the batch per
    window position.
    """
    x = as_float_images(x)
    B, _, H, W = x.shape
    if not (1 <= window <= min(H, W)) or stride < 1:
        raise ValueError(f"need 1 <= window <= {min(H, W)} and stride >= 1, got window={window}, stride={stride}")
    if not 0.0 <= float(fill) <= 1.0:
        raise ValueError(f"fill must lie in [0, 1], got {fill}")
    with torch.no_grad():
        base = logits_fn(x).float()
        target = base.argmax(dim=1) if target is None else check_labels(target, B, base.shape[1]).to(base.device)
        ref = base.gather(1, target.view(-1, 1)).squeeze(1)
        total = torch.zeros(B, H, W, device=x.device)
        count = torch.zeros(H, W, device=x.device)
        for top in _window_starts(H, window, stride):
            for left in _window_starts(W, window, stride):
                xo = x.clone()
                xo[:, :, top : top + window, left : left + window] = float(fill)
                drop = ref - logits_fn(xo).float().gather(1, target.view(-1, 1)).squeeze(1)
                total[:, top : top + window, left : left + window] += drop.view(B, 1, 1)
                count[top : top + window, left : left + window] += 1
    return total / count, target


# --- RoA --------------------------------------------------------------------------------------
def box_filter(maps: torch.Tensor, box: int = 3) -> torch.Tensor:
    """Mean over a ``box`` x ``box`` window centred on each pixel of ``maps`` [B, H, W] (odd ``box``;
    at the border the mean is over the window's pixels inside the image). ``box=1``: unchanged."""
    if box < 1 or box % 2 == 0:
        raise ValueError(f"box must be an odd integer >= 1, got {box}")
    if box == 1:
        return maps.clone()
    return F.avg_pool2d(maps.unsqueeze(1), box, stride=1, padding=box // 2, count_include_pad=False).squeeze(1)


def roa_from_perturbation(x: torch.Tensor, x_adv: torch.Tensor, box: int = 3) -> torch.Tensor:
    """RoA map ``box_filter(sum_c |x_adv - x|)`` [B, H, W]."""
    x, x_adv = as_float_images(x), as_float_images(x_adv)
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    return box_filter((x_adv - x).abs().sum(dim=1), box)


def roa_from_gradient(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target, box: int = 3) -> torch.Tensor:
    """RoA map ``box_filter(sum_c |d CE(logits(x), target) / d x|)`` [B, H, W]: where a small change
    of the image changes the loss most."""
    x = as_float_images(x).detach().clone().requires_grad_(True)
    target = check_labels(target, x.shape[0]).to(x.device)
    loss = F.cross_entropy(logits_fn(x).float(), target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [x])
    return box_filter(grad.abs().sum(dim=1), box)


# --- binarisation, neutralisation, overlap -----------------------------------------------------
def binarize_top_q(maps: torch.Tensor, q: float, positive_only: bool = False) -> torch.Tensor:
    """Boolean masks [B, H, W] keeping the top ``q`` percent of each map's pixels.

    Exactly ``k = floor(q * N / 100 + 0.5)`` pixels per map (N = H W); ties broken by position,
    lower row-major index first. With ``positive_only`` pixels whose value is <= 0 are never kept
    (then fewer than k can be kept): for RoA maps, where a zero means "not changed at all" and
    filling up to k with unchanged pixels in index order would mark an arbitrary region.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, H, W], got {tuple(maps.shape)}")
    if not 0.0 <= float(q) <= 100.0:
        raise ValueError(f"q is a percentage in [0, 100], got {q}")
    if torch.isnan(maps).any():
        raise ValueError("maps contain NaN; importance maps must be comparable numbers")
    B, H, W = maps.shape
    n = H * W
    # exact rational arithmetic on the decimal q: float q * n / 100 can land just below a .5 (64.6 % of 250)
    k = min(n, math.floor(Fraction(repr(float(q))) * n / 100 + Fraction(1, 2)))
    flat = maps.detach().reshape(B, n)
    # stable sort of -values: equal values keep their index order, so lower indices win ties
    order = torch.sort(-flat.double(), dim=1, stable=True).indices
    keep = torch.zeros(B, n, dtype=torch.bool, device=maps.device)
    keep.scatter_(1, order[:, :k], True)
    if positive_only:
        keep &= flat > 0
    return keep.view(B, H, W)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(d**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    k = (k / k.sum()).to(x.dtype).to(x.device)
    xp = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(xp, k.expand(x.shape[1], 1, *k.shape).contiguous(), groups=x.shape[1])


def neutralize(x: torch.Tensor, roi_mask: torch.Tensor, roa_mask: torch.Tensor, fill="mean", blur_sigma: float = 2.0) -> torch.Tensor:
    """Replace the pixels of ``roa_mask & ~roi_mask`` (both bool [B, H, W]) by ``fill`` (see the
    module docstring); all other pixels are unchanged. Returns a new tensor."""
    x = as_float_images(x)
    if roi_mask.shape != roa_mask.shape or tuple(roi_mask.shape) != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"masks must be [B, H, W] = {(x.shape[0], *x.shape[-2:])}, got {tuple(roi_mask.shape)} and {tuple(roa_mask.shape)}")
    region = (roa_mask.bool() & ~roi_mask.bool()).unsqueeze(1).to(x.device)
    if fill == "zero":
        value = torch.zeros_like(x)
    elif fill == "mean":
        value = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    elif fill == "blur":
        if not float(blur_sigma) > 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
        value = _gaussian_blur(x, blur_sigma).clamp(0.0, 1.0)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool) and 0.0 <= float(fill) <= 1.0:
        value = torch.full_like(x, float(fill))
    else:
        raise ValueError(f"fill must be 'zero', 'mean', 'blur' or a number in [0, 1], got {fill!r}")
    return torch.where(region, value, x)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image of boolean masks [B, H, W] -> float [B] (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_across_q(roi_map: torch.Tensor, roa_map: torch.Tensor, qs: Sequence[float]) -> dict:
    """``{q: mean over images of the per-image IoU}`` of the top-q % RoI and the top-q % RoA masks
    (the same q for both; no ``positive_only``, unlike :func:`evaluate_neutralization`)."""
    return {float(q): float(iou(binarize_top_q(roi_map, q), binarize_top_q(roa_map, q)).mean()) for q in qs}


# --- the whole analysis -------------------------------------------------------------------------
def _roi(model, x, target, method, occlusion_window, occlusion_stride, reduce):
    if method == "local":
        return roi_from_local_logits(model, x, target, reduce)[0]
    return occlusion_roi(logits_fn_of(model), x, target, occlusion_window, occlusion_stride)[0]


def evaluate_neutralization(
    model,
    images: torch.Tensor,
    labels,
    attack: str = "patch",
    eps: float = 8 / 255,
    steps: int = 20,
    step: float | None = None,
    attack_patch_size: int = 5,
    roi_method: str = "auto",
    reduce: str = "mean",
    occlusion_window: int = 8,
    occlusion_stride: int = 4,
    roa_box: int = 3,
    q_roi: float = 20.0,
    q_roa: float = 10.0,
    qs: Sequence[float] = (1, 2, 5, 10, 20, 30, 50),
    fill="mean",
    batch_size: int = 100,
    seed: int = 0,
    prediction: str = "model",
    keep: int = 0,
    progress: bool = False,
) -> dict:
    """Attack, RoI / RoA, neutralisation and overlap on ``images`` (uint8 or float [N, 3, H, W]).

    ``attack``: ``"patch"`` (random-position masked patch PGD, ``attack_patch_size``, ``steps``,
    ``step`` default 0.05) or ``"pgd"`` (L-inf, ``eps``, ``steps``, ``step`` default ``eps / 4``).
    ``roi_method``: ``"local"`` (local logits), ``"occlusion"`` or ``"auto"`` (local when the model
    has ``local_logits`` and a ``geometry``).

    Accuracies (model's own prediction, see :mod:`bagcert.defense.common`):

    * ``clean_accuracy``, ``adversarial_accuracy``;
    * ``neutralized_accuracy_oracle``: x_adv with RoA = top ``q_roa`` % of |x_adv - x| (positive
      pixels only, see :func:`binarize_top_q`) and
      RoI = top ``q_roi`` % of the RoI of x_adv (the RoI the defender can compute);
    * ``neutralized_accuracy_gradient``: the same with RoA from the input gradient of x_adv for
      its predicted class (needs nothing but x_adv: a usable defense);
    * ``neutralized_clean_accuracy``: that gradient defense applied to the clean images (its cost).

    Overlap: ``iou_oracle[q]`` / ``iou_gradient[q]``: the per-image IoU of the top-q % RoI of the
    clean image and the top-q % (positive pixels only) oracle / gradient RoA of x_adv, averaged
    over the images (not pooled).

    With ``keep > 0`` the result has ``"examples"``: tensors of the first ``keep`` images (x, x_adv,
    roi_adv, roa_oracle, neutralized) for figures (drop it before writing JSON). ``progress``: a tqdm bar
    on stderr counting the images done.
    """
    t0 = time.perf_counter()
    if attack not in ("patch", "pgd"):
        raise ValueError(f"attack must be 'patch' or 'pgd', got {attack!r}")
    if roi_method not in ("auto", "local", "occlusion"):
        raise ValueError(f"roi_method must be 'auto', 'local' or 'occlusion', got {roi_method!r}")
    if roi_method == "auto":
        roi_method = "local" if hasattr(model, "local_logits") and getattr(model, "geometry", None) is not None else "occlusion"
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(images, 'shape', None)}")
    y_all = check_labels(labels, images.shape[0])
    if images.shape[0] == 0:
        raise ValueError("no images to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    from ..defense.corruptions import linf_pgd
    from ..defense.evaluate import _seed, random_patch_attack

    logits_fn = logits_fn_of(model)
    predict = predict_fn_of(model, prediction)
    n = int(y_all.numel())
    counts = dict.fromkeys(("clean", "adversarial", "neutralized_oracle", "neutralized_gradient", "neutralized_clean"), 0)
    iou_o = {float(q): 0.0 for q in qs}
    iou_g = {float(q): 0.0 for q in qs}
    examples = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc="roi", disable=not progress, leave=False)
    with eval_mode(model):
        for bi, start in enumerate(range(0, n, batch_size)):
            if bi:
                bar.update(batch_size)  # the previous batch (only the last one can be short)
            x = as_float_images(images[start : start + batch_size]).clone()
            y = y_all[start : start + batch_size]
            sd = _seed(seed, bi)
            if attack == "patch":
                x_adv = random_patch_attack(logits_fn, x, y, attack_patch_size, steps, 0.05 if step is None else step, seed=sd, predict_fn=predict)[0]
            else:
                x_adv = linf_pgd(logits_fn, x, y, eps, steps, eps / 4 if step is None else step, seed=sd)
            pred_clean, pred_adv = predict(x), predict(x_adv)
            roi_clean = _roi(model, x, pred_clean, roi_method, occlusion_window, occlusion_stride, reduce)
            roi_adv = _roi(model, x_adv, pred_adv, roi_method, occlusion_window, occlusion_stride, reduce)
            roa_oracle = roa_from_perturbation(x, x_adv, roa_box)
            roa_grad_adv = roa_from_gradient(logits_fn, x_adv, pred_adv, roa_box)
            roa_grad_clean = roa_from_gradient(logits_fn, x, pred_clean, roa_box)
            roi_adv_m = binarize_top_q(roi_adv, q_roi)
            x_n_oracle = neutralize(x_adv, roi_adv_m, binarize_top_q(roa_oracle, q_roa, positive_only=True), fill)
            x_n_grad = neutralize(x_adv, roi_adv_m, binarize_top_q(roa_grad_adv, q_roa, positive_only=True), fill)
            x_n_clean = neutralize(x, binarize_top_q(roi_clean, q_roi), binarize_top_q(roa_grad_clean, q_roa, positive_only=True), fill)
            for key, z in (("clean", x), ("adversarial", x_adv), ("neutralized_oracle", x_n_oracle),
                           ("neutralized_gradient", x_n_grad), ("neutralized_clean", x_n_clean)):
                counts[key] += int((predict(z).cpu() == y).sum())
            for q in iou_o:
                roi_q = binarize_top_q(roi_clean, q)
                iou_o[q] += float(iou(roi_q, binarize_top_q(roa_oracle, q, positive_only=True)).sum())
                iou_g[q] += float(iou(roi_q, binarize_top_q(roa_grad_adv, q, positive_only=True)).sum())
            if keep > 0 and start < keep:
                k = min(keep - start, x.shape[0])
                part = {"x": x[:k], "x_adv": x_adv[:k], "roi_clean": roi_clean[:k], "roi_adv": roi_adv[:k],
                        "roa_oracle": roa_oracle[:k], "roa_gradient": roa_grad_adv[:k], "neutralized": x_n_oracle[:k],
                        "label": y[:k], "pred_clean": pred_clean[:k].cpu(), "pred_adv": pred_adv[:k].cpu(),
                        "pred_neutralized": predict(x_n_oracle[:k]).cpu()}
                for name, v in part.items():
                    examples[name] = torch.cat([examples[name], v.detach().cpu()]) if name in examples else v.detach().cpu()
    bar.update(n - bar.n)
    bar.close()
    out = {
        "n": n,
        "attack": {"kind": attack, "eps": eps if attack == "pgd" else None, "steps": steps,
                   "step": step if step is not None else (0.05 if attack == "patch" else eps / 4),
                   "patch_size": attack_patch_size if attack == "patch" else None},
        "roi_method": roi_method,
        "reduce": reduce if roi_method == "local" else None,
        "roa_box": roa_box, "q_roi": q_roi, "q_roa": q_roa, "fill": fill, "prediction": prediction,
        "clean_accuracy": counts["clean"] / n,
        "adversarial_accuracy": counts["adversarial"] / n,
        "neutralized_accuracy_oracle": counts["neutralized_oracle"] / n,
        "neutralized_accuracy_gradient": counts["neutralized_gradient"] / n,
        "neutralized_clean_accuracy": counts["neutralized_clean"] / n,
        "iou_oracle": {str(q): v / n for q, v in iou_o.items()},
        "iou_gradient": {str(q): v / n for q, v in iou_g.items()},
        "timing_s": time.perf_counter() - t0,
    }
    if keep > 0:
        out["examples"] = examples
    return out


# --- figures ----------------------------------------------------------------------------------
def roi_method_title(results: dict) -> str:
    """The method of a RoI / RoA figure from :func:`evaluate_neutralization`'s ``results`` (optionally with
    ``"checkpoint": {"model": name}``), e.g. ``"RoI local (mean), RoA, patch 5x5 attack (20 steps); cifar_bagnet5_s2"``."""
    a = results["attack"]
    attack = f"patch {a['patch_size']}x{a['patch_size']} attack" if a["kind"] == "patch" else f"L-inf PGD eps {a['eps']:.4g}"
    roi = f"RoI {results['roi_method']}" + (f" ({results['reduce']})" if results.get("reduce") else "")
    model = (results.get("checkpoint") or {}).get("model")
    return f"{roi} vs RoA, {attack} ({a['steps']} steps)" + (f"; {model}" if model else "")


def _roi_unit(roi_method: str) -> str:
    return ("local logit of the predicted class" if roi_method == "local"
            else "drop of the predicted class's logit when occluded")


def iou_figure(results: dict, method: str | None = None):
    """The mean IoU of RoI and RoA against q (a matplotlib Figure) from :func:`evaluate_neutralization`'s
    ``results``; the title names ``method`` (default :func:`roi_method_title`). Needs matplotlib."""
    from ..report import _require_pyplot, _wrap_title

    plt = _require_pyplot()
    qs = [float(q) for q in results["iou_oracle"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    ax.plot(qs, list(results["iou_oracle"].values()), marker="o", label="RoA = |x_adv - x| (oracle)")
    ax.plot(qs, list(results["iou_gradient"].values()), marker="s", label="RoA = input gradient")
    ax.set_xlabel("q (% of pixels kept in each mask)")
    ax.set_ylabel("mean per-image IoU(RoI clean, RoA)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(_wrap_title(f"{method or roi_method_title(results)}\noverlap of RoI and RoA, n={results['n']}", 5.5), fontsize=9)
    return fig


def roi_heatmap_figure(examples: dict, results: dict, classes=None, method: str | None = None):
    """RoI / RoA heatmaps of the kept examples (a matplotlib Figure): per image (rows) the clean and the
    adversarial image with their predictions, the RoI of both (one shared colour scale and bar, in the RoI's
    unit), the oracle RoA ``|x_adv - x|`` and the gradient RoA (a colour bar each), and the neutralised image.

    Args:
        examples: ``evaluate_neutralization(..., keep=k)["examples"]`` (tensors of k >= 1 images).
        results: the rest of that result (attack, roi_method, roa_box, ...).
        classes: class names (wnids shown by name, :func:`bagcert.report.class_name`) or None (indices).
        method: the title's method (default :func:`roi_method_title`).
    """
    from ..report import _require_pyplot, _wrap_title, class_name

    plt = _require_pyplot()
    ex = examples
    k = int(ex["x"].shape[0])
    if k < 1:
        raise ValueError("roi_heatmap_figure: no examples to show")
    box = results.get("roa_box", 3)
    heads = ["clean image", "adversarial image", "RoI (clean)", "RoI (adversarial)", "RoA |x_adv - x|", "RoA gradient (adv.)",
             "neutralised (oracle)"]
    width = 1.75 * len(heads) + 0.4
    fig, axes = plt.subplots(k, len(heads), figsize=(width, 1.9 * k + 2.0), squeeze=False, layout="constrained")
    roi_all = torch.cat([ex["roi_clean"][:k], ex["roi_adv"][:k]])
    scales = {2: (float(roi_all.min()), float(roi_all.max())), 3: (float(roi_all.min()), float(roi_all.max())),
              4: (0.0, float(ex["roa_oracle"][:k].max())), 5: (0.0, float(ex["roa_gradient"][:k].max()))}
    ims = {}
    for i in range(k):
        y = int(ex["label"][i])
        panels = [ex["x"][i], ex["x_adv"][i], ex["roi_clean"][i], ex["roi_adv"][i], ex["roa_oracle"][i], ex["roa_gradient"][i],
                  ex["neutralized"][i]]
        preds = {0: ex["pred_clean"][i], 1: ex["pred_adv"][i], 6: ex["pred_neutralized"][i]}
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            if img.dim() == 3:
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                lo, hi = scales[j]
                ims[j] = ax.imshow(img.numpy(), cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1e-12, interpolation="nearest")
            lines = [heads[j]] if i == 0 else []
            if j in preds:
                p = int(preds[j])
                lines.append(f"pred: {class_name(classes, p)}" + ("" if p == y else " (wrong)"))
            if lines:
                ax.set_title("\n".join(lines), fontsize=7, color="black" if j not in preds or int(preds[j]) == y else "tab:red")
        axes[i][0].set_ylabel(f"true: {class_name(classes, y)}", fontsize=8)
    bars = [([2, 3], f"RoI: {_roi_unit(results['roi_method'])}"),
            ([4], f"RoA: |x_adv - x|\n(channel sum, {box}x{box} mean)"),
            ([5], f"RoA: |d CE / d x_adv|\n(channel sum, {box}x{box} mean)")]
    for cols, label in bars:
        cb = fig.colorbar(ims[cols[0]], ax=[axes[r][c] for r in range(k) for c in cols], location="bottom", shrink=0.9, aspect=15)
        cb.set_label(label, fontsize=7)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(_wrap_title(f"{method or roi_method_title(results)}\nred: prediction differs from the true class", width), fontsize=9)
    return fig
