"""Feature-space worst case: the strongest attack the certificate's threat model allows, carried out on the
local logits instead of the pixels.

For every patch position p (one per distinct affected window R(p)) and every class c != y (y the clean
prediction), the local logits inside R(p) are set to their worst values -- the logit of c to ``+big`` (every
affected location votes for c), the logit of y to ``-big`` (none votes for y) -- and the map is re-aggregated
with the model's own aggregation code (:meth:`bagcert.aggregation.Aggregation.class_scores`). Nothing outside
R(p) changes: the receptive-field geometry says a patch at p cannot reach it.

* ``broken``: for some p and c the new score of c is >= the new score of y. This is exactly "the certificate
  cannot rule p out": the certificate never certifies a tie, so ties count as broken here whichever way the
  tie rule would resolve them. ``broken == ~certified`` holds exactly for the integer aggregations (``votes``,
  ``majority``); for ``clipped`` up to the certificate's float tolerance. The certificate is therefore tight in
  feature space: every uncertified sample has a feature map, reachable under the geometry, that breaks it.
  Whether pixels can produce that map is what the image-space attacks measure.
* ``flipped``: the re-aggregated argmax (ties to the lower class index) actually differs from y (a subset of
  ``broken``).

For ``votes`` and ``clipped`` the per-location score of each class depends only on that class's own logit, so
all classes c != y are raised at once (one re-aggregation per window). ``majority`` gives each location one
vote, so each class c is raised in turn (C - 1 re-aggregations per window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..aggregation import get_aggregation
from ..certification import _check_labels
from ..geometry import parse_patch_size
from .base import check_int

__all__ = ["FeatureSpaceResult", "FeatureSpaceWorstCase", "feature_space_worst_case"]


@dataclass
class FeatureSpaceResult:
    """Per-sample outcome of :func:`feature_space_worst_case` (N samples).

    Attributes:
        prediction: long [N], clean prediction.
        label: long [N] (-1 when no labels were given).
        correct: bool [N].
        broken: bool [N], some position and class reach a score >= the prediction's (== not certified).
        flipped: bool [N], some position and class change the argmax.
        margin: [N], min over positions and classes of new score(prediction) - new score(c) (int64 for integer
            aggregations, float64 otherwise); broken iff margin <= 0 (<= tolerance for floats).
        worst_position: long [N, 2], top-left pixel of a patch position reaching ``margin``.
        worst_class: long [N], a class reaching ``margin``.
        patch_size: (height, width).
        aggregation: the aggregation used.
    """

    prediction: torch.Tensor
    label: torch.Tensor
    correct: torch.Tensor
    broken: torch.Tensor
    flipped: torch.Tensor
    margin: torch.Tensor
    worst_position: torch.Tensor
    worst_class: torch.Tensor
    patch_size: tuple
    aggregation: str

    @property
    def robust(self) -> torch.Tensor:
        """bool [N]: correct and not broken (the feature-space robust accuracy equals the certified accuracy)."""
        return self.correct & ~self.broken

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.prediction.numel() else float("nan")


def _first_index(inverse: torch.Tensor, n_unique: int) -> torch.Tensor:
    pos = torch.arange(inverse.numel(), dtype=torch.long)
    first = torch.full((n_unique,), inverse.numel(), dtype=torch.long)
    return first.scatter_reduce(0, inverse.cpu(), pos, reduce="amin")


@torch.no_grad()
def feature_space_worst_case(
    model_or_logits,
    images: torch.Tensor | None = None,
    labels=None,
    *,
    patch_size,
    geometry=None,
    image_size=None,
    aggregation=None,
    big: float = 1e4,
    max_elements: int = 2**24,
) -> FeatureSpaceResult:
    """Worst case in feature space for every patch position (module doc).

    Args:
        model_or_logits: a bagcert model (then ``images`` are required; the model must be in eval mode), or a
            local-logit map [N, C, h, w] (then ``geometry`` and ``image_size`` are required).
        images: float [N, 3, H, W] in [0, 1] (model form only).
        labels: long [N] or None.
        patch_size: int or (height, width).
        aggregation: default the model's own (``"votes"`` for a bare logit map).
        big: the magnitude written into the affected logits (1e4 saturates every aggregation here exactly).
        max_elements: memory budget of one batch of modified maps.
    """
    if isinstance(model_or_logits, torch.Tensor):
        logits = model_or_logits
        if geometry is None or image_size is None:
            raise ValueError("a bare logit map needs geometry= and image_size=")
        aggregation = aggregation or "votes"
    else:
        model = model_or_logits
        if getattr(model, "training", False):
            raise RuntimeError("model is in training mode; call model.eval() first")
        if images is None:
            raise ValueError("feature_space_worst_case(model, images, ...) needs the images")
        logits = model.local_logits(images)
        geometry = model.geometry
        image_size = tuple(images.shape[-2:])
        aggregation = aggregation or getattr(model, "aggregation", "votes")
    if logits.dim() != 4:
        raise ValueError(f"local logits must be [N, C, h, w], got {tuple(logits.shape)}")
    agg = get_aggregation(aggregation)
    N, C, h, w = logits.shape
    H, W = int(image_size[0]), int(image_size[1])
    if geometry.grid_size(H, W) != (h, w):
        raise ValueError(f"logit map {h}x{w} does not match the geometry's {geometry.grid_size(H, W)} for {H}x{W} images")
    ph, pw = parse_patch_size(patch_size)
    if ph > H or pw > W:
        raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image")
    labels = _check_labels(labels, N, C, logits.device)
    logits = logits.double() if not agg.exact_integer else logits.float()
    dev = logits.device
    prediction = agg.class_scores(logits).argmax(dim=1)

    rows, cols = geometry.affected_ranges((H, W), (ph, pw))
    ur, inv_r = torch.unique(rows, dim=0, return_inverse=True)
    uc, inv_c = torch.unique(cols, dim=0, return_inverse=True)
    first_r, first_c = _first_index(inv_r, ur.shape[0]), _first_index(inv_c, uc.shape[0])
    gi, gj = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rin = (gi[None] >= ur[:, :1].to(dev)) & (gi[None] <= ur[:, 1:].to(dev))  # [Ur, h]
    cin = (gj[None] >= uc[:, :1].to(dev)) & (gj[None] <= uc[:, 1:].to(dev))  # [Uc, w]
    windows = (rin[:, None, :, None] & cin[None, :, None, :]).reshape(-1, h, w)  # [U, h, w], U = Ur * Uc
    U = windows.shape[0]

    int_scores = agg.exact_integer
    inf = torch.iinfo(torch.int64).max if int_scores else float("inf")
    best = torch.full((N,), inf, dtype=torch.int64 if int_scores else torch.float64, device=dev)
    best_w = torch.zeros(N, dtype=torch.long, device=dev)
    best_c = torch.zeros(N, dtype=torch.long, device=dev)
    flipped = torch.zeros(N, dtype=torch.bool, device=dev)
    onehot_y = torch.nn.functional.one_hot(prediction, C).bool()[:, :, None, None]  # [N, C, 1, 1]
    classes = [None] if agg.name != "majority" else list(range(C))
    chunk = max(1, max_elements // max(1, N * C * h * w))
    for c in classes:
        if c is None:
            # votes / clipped: every class but y up, y down, inside the window
            worst = torch.where(onehot_y, torch.full_like(logits[:1, :, :1, :1], -big), torch.full_like(logits[:1, :, :1, :1], big))
            worst = worst.expand(N, C, 1, 1)
        else:
            # majority: class c up, every other class down (c wins the location's single vote)
            worst = torch.full((1, C, 1, 1), -big, dtype=logits.dtype, device=dev)
            worst[0, c] = big
            worst = worst.expand(N, C, 1, 1)
        for u0 in range(0, U, chunk):
            win = windows[u0 : u0 + chunk]  # [u, h, w]
            z = torch.where(win[:, None, None], worst[None], logits[None])  # [u, N, C, h, w]
            u = z.shape[0]
            new = agg.class_scores(z.reshape(u * N, C, h, w)).reshape(u, N, C)
            new = new.to(torch.int64) if int_scores else new.double()
            new_y = new.gather(2, prediction.view(1, N, 1).expand(u, N, 1))
            diff = new_y - new  # [u, N, C]: new score(y) - new score(c)
            if c is None:
                diff = diff.masked_fill(onehot_y[:, :, 0, 0][None], inf)
            else:
                keep = torch.zeros(C, dtype=torch.bool, device=dev)
                keep[c] = True
                diff = diff.masked_fill(~keep.view(1, 1, C) | onehot_y[:, :, 0, 0][None], inf)
            flipped |= (new.argmax(dim=2) != prediction[None]).any(dim=0)
            dmin, dcls = diff.min(dim=2)  # [u, N]
            wmin, warg = dmin.min(dim=0)  # [N]
            upd = wmin < best
            best = torch.where(upd, wmin, best)
            best_w = torch.where(upd, warg + u0, best_w)
            best_c = torch.where(upd, dcls.gather(0, warg[None]).squeeze(0), best_c)
    if int_scores:
        broken = best <= 0
    else:
        # the certificate demands a margin clearly above float rounding: mirror its tolerance
        broken = best <= 1e-9 * max(1.0, h * w * agg.spread)
    wr = first_r.to(dev)[best_w // uc.shape[0]]
    wc = first_c.to(dev)[best_w % uc.shape[0]]
    label_out = labels if labels is not None else torch.full((N,), -1, dtype=torch.long, device=dev)
    correct = prediction == labels if labels is not None else torch.zeros(N, dtype=torch.bool, device=dev)
    return FeatureSpaceResult(
        prediction=prediction,
        label=label_out,
        correct=correct,
        broken=broken,
        flipped=flipped,
        margin=best,
        worst_position=torch.stack([wr, wc], dim=1),
        worst_class=best_c,
        patch_size=(ph, pw),
        aggregation=agg.name,
    )


class FeatureSpaceWorstCase:
    """:func:`feature_space_worst_case` as an entry of :func:`bagcert.empirical.evaluate_empirical`'s attack list.

    Not an image-space attack (no pixels are produced): its robust flags bound every patch attack of the
    threat model from above, and must coincide with the certificate."""

    name = "feature-space"

    def __init__(self, batch_size: int = 64):
        self.batch_size = check_int("batch_size", batch_size)

    def settings(self) -> dict:
        return {"batch_size": self.batch_size}

    def __call__(self, model, images, labels, patch_size) -> FeatureSpaceResult:
        parts = []
        for i in range(0, images.shape[0], self.batch_size):
            y = None if labels is None else torch.as_tensor(labels)[i : i + self.batch_size]
            parts.append(feature_space_worst_case(model, images[i : i + self.batch_size], y, patch_size=patch_size))
        first = parts[0]
        return FeatureSpaceResult(
            **{f: torch.cat([getattr(p, f) for p in parts]) for f in ("prediction", "label", "correct", "broken", "flipped", "margin", "worst_position", "worst_class")},
            patch_size=first.patch_size,
            aggregation=first.aggregation,
        )

    def __repr__(self) -> str:
        return f"FeatureSpaceWorstCase(batch_size={self.batch_size})"
