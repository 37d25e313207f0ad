"""The certified-robustness training loss (BagCert-style).

Forward pass: hard per-class votes ``s = H(z)`` (Heaviside of the local logit), exactly as the
certificate uses them. Backward pass: the step is replaced by a sigmoid of temperature ``tau``
(straight-through estimator): ``ds/dz = sigmoid'(z / tau) / tau``.

Worst-case margin (the certificate of :mod:`bagcert.certification` with the label y as the
protected class), for every patch position p and class c != y:

    m_c(p) = (T_y - T_c) - (W_y(p) - W_c(p)) - |R(p)|,      m = min_{p, c} m_c(p)

with window sums equal to the certificate's integral-image sums (for votes exactly: products with 0/1 range
matrices, :func:`_window_sum_all`), for one or several patch sizes (the minimum over sizes). ``m > 0`` iff ``bagcert.certify`` certifies the sample and it is correct. The margin is
normalised by the number of locations N and passed into a hinge ``relu(kappa - m / N)``.

Auxiliary term: per-location binary cross-entropy on the logits with the one-hot label as target
(every location should vote for the true class and only it). It gives every location a useful
gradient from the first step, while the margin term only speaks through locations near the
decision threshold of the worst window. See docs/training.md for the ablation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import Geometry, parse_patch_size

__all__ = ["straight_through_votes", "worst_case_margin", "BagCertLoss"]


class _STVotes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tau):
        ctx.save_for_backward(z)
        ctx.tau = tau
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(z.float() / ctx.tau)
        return (grad.float() * s * (1 - s) / ctx.tau).to(z.dtype), None


def straight_through_votes(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard votes ``z > 0`` in the forward pass, sigmoid(z / tau) gradient in the backward pass."""
    return _STVotes.apply(z, tau)


def location_bce(z: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """The auxiliary per-location binary cross-entropy of the certified losses: every location of the local logits
    ``z`` [B, C, h, w] should vote for the label ``labels`` int64 [B] and only it; ``pos_weight`` weighs the positive
    term (``--bce-pos-weight``). Mean over locations and classes, times C (a 0-d tensor)."""
    C = z.shape[1]
    target = F.one_hot(labels, C).to(z.dtype)[:, :, None, None].expand_as(z)
    pw = None if pos_weight == 1.0 else z.new_tensor(pos_weight)
    return F.binary_cross_entropy_with_logits(z, target, reduction="mean", pos_weight=pw) * C


def _window_sum_all(votes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Differentiable window sums [B, C, Ur, Uc] of ``votes`` [B, C, h, w] over the inclusive location ranges
    ``rows`` [Ur, 2] and ``cols`` [Uc, 2] (int64).

    Two matrix products with 0/1 range matrices, ``A_rows @ votes @ A_cols^T`` (``A[u, i] = 1`` iff location ``i``
    lies in range ``u``), in float32 (float64 votes: float64), with autocast disabled. For votes that are whole
    numbers (hard votes, and the straight-through votes' forward values) every sum is exact, so the result is
    bit-identical to the integral-image formula (tested); the backward pass is the transposed products,
    ``A_rows^T @ grad @ A_cols``, which adds the same terms in another order (equal up to float rounding). Under
    ``torch.compile`` called inside a bf16 autocast region, the compiled backward products were measured at bf16
    precision (gradients ~2e-4 off; values exact): call the loss outside autocast, as the training loop does. Against indexing an integral image (``index_select`` and its
    ``index_add`` backward, cumulative sums and their flipped backward) this is 5x faster on CPU, and inductor
    compiles it to two GEMMs.
    """
    dtype = votes.dtype if votes.dtype in (torch.float32, torch.float64) else torch.float32
    a_rows = _range_matrix(rows, votes.shape[2], dtype)
    a_cols = _range_matrix(cols, votes.shape[3], dtype)
    with torch.autocast(device_type=votes.device.type, enabled=False):
        return torch.matmul(torch.matmul(a_rows, votes.to(dtype)), a_cols.t())


def _range_matrix(ranges: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[U, n] of ``dtype`` on the device of ``ranges``: 1 where ``ranges[u, 0] <= i <= ranges[u, 1]`` (inclusive
    location ranges), else 0."""
    i = torch.arange(n, device=ranges.device)
    return ((i[None, :] >= ranges[:, :1]) & (i[None, :] <= ranges[:, 1:])).to(dtype)


_RANGES_CACHE: dict = {}


def _unique_ranges(geometry: Geometry, image_size, size, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique`` of ``geometry.affected_ranges`` (rows, cols) on ``device``, computed once per (geometry,
    image size, patch size, device): the loss asks for them at every training step."""
    key = (geometry, tuple(image_size), parse_patch_size(size), str(device))
    hit = _RANGES_CACHE.get(key)
    if hit is None:
        rows, cols = geometry.affected_ranges(tuple(image_size), parse_patch_size(size))
        hit = (torch.unique(rows, dim=0).to(device), torch.unique(cols, dim=0).to(device))
        if len(_RANGES_CACHE) > 256:
            _RANGES_CACHE.clear()
        _RANGES_CACHE[key] = hit
    return hit


def _margins_per_size(votes: torch.Tensor, labels: torch.Tensor, geometry: Geometry, image_size, patch_sizes):
    """For each patch size: the margins ``m_c(p)`` [B, C, Ur, Uc] over classes and patch positions (the label's own
    entries are 0 here, not excluded) and the label mask [B, C, 1, 1] (bool, True at the label)."""
    B, C, h, w = votes.shape
    # bool / integer / half-precision votes: float32 (a bf16 total over 256 locations would round)
    v = votes if votes.dtype in (torch.float32, torch.float64) else votes.float()
    total = v.sum(dim=(2, 3))  # [B, C]
    y = labels.view(B, 1)
    diff_total = total.gather(1, y) - total  # T_y - T_c
    is_label = F.one_hot(labels, C).bool()[:, :, None, None]
    for size in patch_sizes:
        rows, cols = _unique_ranges(geometry, image_size, size, v.device)
        win = _window_sum_all(v, rows, cols)  # [B, C, Ur, Uc]
        win_y = win.gather(1, y.view(B, 1, 1, 1).expand(B, 1, win.shape[2], win.shape[3]))
        size_R = ((rows[:, 1] - rows[:, 0] + 1)[:, None] * (cols[:, 1] - cols[:, 0] + 1)[None, :]).to(win.dtype)
        yield diff_total[:, :, None, None] - (win_y - win) - size_R, is_label


def worst_case_margin(votes: torch.Tensor, labels: torch.Tensor, geometry: Geometry, image_size, patch_sizes, reduce: str = "min") -> torch.Tensor:
    """Smallest certificate margin over patch sizes, positions and classes c != label: [B].

    ``votes`` may be hard votes (then the result equals the certificate's margin for samples whose
    prediction is the label) or straight-through votes (differentiable). ``reduce="none"`` returns
    every margin instead, [B, K] over (size, class, position), with ``+inf`` in the label's entries.
    """
    if reduce not in ("min", "none"):
        raise ValueError(f"reduce must be 'min' or 'none', got {reduce!r}")
    worst = None
    for m, is_label in _margins_per_size(votes, labels, geometry, image_size, patch_sizes):
        m = m.masked_fill(is_label, float("inf"))
        if reduce == "none":
            worst = m.flatten(1) if worst is None else torch.cat([worst, m.flatten(1)], dim=1)
            continue
        m = m.flatten(1).min(dim=1).values
        worst = m if worst is None else torch.minimum(worst, m)
    return worst


def _mean_hinge(votes: torch.Tensor, labels: torch.Tensor, geometry: Geometry, image_size, patch_sizes, kappa: float):
    """``(hinge [B], margin [B])`` of ``margin_reduce="mean"``: the mean of ``relu(kappa - m_c(p) / N)`` over every
    size, position and class c != label, and the smallest margin (detached). Equal, up to float rounding, to
    averaging :func:`worst_case_margin` ``(reduce="none")``'s finite entries, without its [B, K] concatenation."""
    B, C, h, w = votes.shape
    total, count, margin = None, 0, None
    for m, is_label in _margins_per_size(votes, labels, geometry, image_size, patch_sizes):
        part = F.relu(kappa - m / (h * w)).masked_fill(is_label, 0.0).sum(dim=(1, 2, 3))
        total = part if total is None else total + part
        count += (C - 1) * m.shape[2] * m.shape[3]
        worst = m.detach().masked_fill(is_label, float("inf")).amin(dim=(1, 2, 3))
        margin = worst if margin is None else torch.minimum(margin, worst)
    return total / count, margin


class BagCertLoss(torch.nn.Module):
    """``margin_weight * relu(kappa - m / N) + bce_weight * BCE(local logits, one-hot) + ce_weight * CE(mean logits)``.

    ``margin_reduce="min"`` hinges the worst margin (the certificate itself: its gradient reaches the
    locations of one window and one class). ``"mean"`` averages the hinge over every patch position,
    size and wrong class, ``mean relu(kappa - m_c(p) / N)``: zero exactly when every window's margin
    clears kappa, and every window below that target passes gradient.

    Args:
        geometry: the model's geometry.
        image_size: (H, W).
        patch_sizes: sizes to be robust against (the margin is the minimum over them).
        tau: temperature of the straight-through sigmoid.
        kappa: target normalised margin.
        margin_weight, bce_weight, ce_weight: mixing weights (set a weight to 0 to ablate a term).
        label_smoothing: for the CE term.
        bce_pos_weight: weight of the positive (true-class) term of the BCE; w > 1 lowers the
            posterior at which a location votes for its class from 0.5 to 1 / (1 + w).
        margin_reduce: ``"min"`` or ``"mean"`` (see above).
    """

    def __init__(self, geometry, image_size, patch_sizes=(5,), tau=1.0, kappa=0.25, margin_weight=1.0, bce_weight=1.0, ce_weight=0.0, label_smoothing=0.0, bce_pos_weight=1.0, margin_reduce="min"):
        super().__init__()
        if margin_reduce not in ("min", "mean"):
            raise ValueError(f"margin_reduce must be 'min' or 'mean', got {margin_reduce!r}")
        self.margin_reduce = margin_reduce
        self.geometry = geometry
        self.image_size = tuple(image_size)
        self.patch_sizes = [parse_patch_size(p) for p in patch_sizes]
        self.tau, self.kappa = float(tau), float(kappa)
        self.margin_weight, self.bce_weight, self.ce_weight = float(margin_weight), float(bce_weight), float(ce_weight)
        self.label_smoothing = float(label_smoothing)
        self.bce_pos_weight = float(bce_pos_weight)

    def forward(self, local_logits: torch.Tensor, labels: torch.Tensor, margin_weight: float | None = None):
        """Returns ``(loss, stats)``: stats holds the detached loss terms (0-dim tensors, so that the
        training loop can average them over its logging window without a host sync each step) and
        the hard margins."""
        z = local_logits.float()
        B, C, h, w = z.shape
        stats = {}
        loss = z.new_zeros(())
        mw = self.margin_weight if margin_weight is None else margin_weight
        votes = straight_through_votes(z, self.tau)
        if self.margin_reduce == "min":
            margin = worst_case_margin(votes, labels, self.geometry, self.image_size, self.patch_sizes)
            hinge = F.relu(self.kappa - margin / (h * w))
        else:
            hinge, margin = _mean_hinge(votes, labels, self.geometry, self.image_size, self.patch_sizes, self.kappa)
        stats["margin"] = margin.detach()
        if isinstance(mw, torch.Tensor) or mw > 0:  # a tensor weight (compiled training): always, weight 0 adds 0
            l_margin = hinge.mean()
            loss = loss + mw * l_margin
            stats["loss_margin"] = l_margin.detach()
        if self.bce_weight > 0:
            l_bce = location_bce(z, labels, self.bce_pos_weight)
            loss = loss + self.bce_weight * l_bce
            stats["loss_bce"] = l_bce.detach()
        if self.ce_weight > 0:
            l_ce = F.cross_entropy(z.mean(dim=(2, 3)), labels, label_smoothing=self.label_smoothing)
            loss = loss + self.ce_weight * l_ce
            stats["loss_ce"] = l_ce.detach()
        stats["loss"] = loss.detach()
        return loss, stats
