r"""Certified training for double masking on the local evidence map (``train.py --loss masking``).

:class:`~bagcert.peers.LocalDoubleMasking` certifies a sample iff every one-mask and two-mask prediction on the
local evidence map equals the label (PatchCleanser's two-mask correctness, read off window sums; see
:mod:`bagcert.peers.local_masking`). :class:`~bagcert.losses.BagCertLoss` trains for the BagCert certificate
(the worst single window with the patch's votes handed to the best other class), not for this one. This loss
trains for the masking certificate directly.

Evidence, as the certifier reads it: ``u = clamp(z, -clip, clip)`` (``evidence="logits"``, the default
certificate of the shipped CIFAR-10 model is double masking of logits clipped to (-1, 1)) or straight-through votes
``1[z > 0]`` (``evidence="votes"``, sigmoid(z / tau) gradient, :func:`bagcert.losses.straight_through_votes`).

Mask set: :func:`~bagcert.peers.local_masking.feature_mask_set` of each training patch size on the *training* map
(the model's geometry at the training image size), the same set ``LocalDoubleMasking`` (default ``k=None``) uses
to certify images of that size. For a mask m and a pair (m1, m2), with ``T_c = sum_l u[c, l]`` and ``W_c(A)`` the
evidence of c summed over window A (an integral image: differentiable, one cumsum per axis):

    count_c(m)       = T_c - W_c(m)
    count_c(m1, m2)  = T_c - W_c(m1) - W_c(m2) + W_c(m1 ∩ m2)      (m1 ∩ m2 is again a window, maybe empty)

and the margin of a pair ``mu(m1, m2) = min_{c != y} (count_y - count_c + [c > y] for votes)``: the certifier's
tie rule (ties go to the lower class index; float evidence has no tie allowance, an exact tie is not
certified). ``count(m, m) = count(m)``, so pairs include the single masks. The certificate holds iff
``min_{m1, m2} mu(m1, m2) > 0`` (for logits: above the certifier's float tolerance, ~1e-9 * h * w * clip).

Worst case (``pairs``):
  * ``"all"``: the exact minimum over all M^2 pairs (chunked over m1 so that memory stays at ~``_CHUNK``
    elements of [B, C, k, M]). Its margin equals ``LocalDoubleMasking(exact_margin=True)``'s where the
    certifier predicts the label.
  * ``"greedy"`` (default): m1 = the single mask of smallest margin, then m2 = the mask of smallest
    ``mu(m1, m2)`` (2 M evaluations). The pair is a real pair, so its margin is an *upper bound* of the exact
    worst case (it can miss a pair whose masks are each harmless alone); its value is <= the worst single mask.
The search for the worst pair runs without autograd; the loss then evaluates the chosen pair's counts
differentiably (the gradient of a minimum is that of its minimiser, so this is the same gradient at a fraction
of the memory). With several training patch sizes the worst pair over all sizes is used.

Loss (per batch, means over samples):

    margin_weight * CE(s * count(m1*, m2*) / (N * a), y) + ce_weight * CE(s * T / (N * a), y) + bce_weight * BCE

with N = h * w locations, a = clip (logits) or 1 (votes), so that ``count / (N a)`` lies in [-1, 1] whatever the
map size (as BagCertLoss divides its margin by N), and ``s = scale`` a temperature. Default ``s = 10``: a
normalised class gap g gives a logit gap ``s g``; a fully confident map (every location at +clip for y and -clip
for the others, g = 2) gives CE ~ 9 e^-20 (no saturation of the softmax at the start, where counts are ~0 and
CE = ln C), while the gap needed for a comfortable certificate, g ~ 0.25 (a quarter of the map's evidence), is
where CE ~ 0.5 with 10 classes still pushes. The margin weight is warmed up exactly as BagCertLoss's
(``--margin-weight``, ``--margin-warmup-epochs``). The clean term is the CE of the certifier's own clean
aggregate; the BCE term is BagCertLoss's per-location BCE on the raw logits (with ``bce_pos_weight``): clipping
stops the gradient of a location beyond the clip, and the BCE still reaches it.

Cost: one integral image of the evidence and one of ``u_y - u``, then window sums over [B, C, M] (greedy: 2 M
evaluations per sample). ``benchmarks/masking_loss_cost.py`` times it against BagCertLoss.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .geometry import Geometry, parse_patch_size
from .losses import location_bce, straight_through_votes
from .peers.local_masking import FeatureMaskSet, feature_mask_set

__all__ = ["DoubleMaskingLoss", "masked_worst_case", "MASKING_EVIDENCE", "MASKING_PAIRS"]

MASKING_EVIDENCE = ("logits", "votes")
MASKING_PAIRS = ("greedy", "all")
_CHUNK = 1 << 23  # elements of one [B, C, k, M] block of the "all" search


@functools.lru_cache(maxsize=64)
def _corner_tables(ms: FeatureMaskSet, device: str):
    """Flat integral-image corners of every mask, long [4, M], and of every intersection m1 ∩ m2, long [4, M, M]
    (an empty intersection gets a zero-area window). A window's sum is ``S[i0] - S[i1] - S[i2] + S[i3]``."""
    h, w = ms.grid
    mh, mw = ms.mask_size
    W1 = w + 1
    rs = torch.tensor(ms.row_starts, dtype=torch.long)
    cs = torch.tensor(ms.col_starts, dtype=torch.long)
    r0 = rs.repeat_interleave(len(cs))
    c0 = cs.repeat(len(rs))
    r1, c1 = r0 + mh, c0 + mw  # exclusive ends

    def corners(a0, a1, b0, b1):
        return torch.stack([a1 * W1 + b1, a0 * W1 + b1, a1 * W1 + b0, a0 * W1 + b0])

    single = corners(r0, r1, c0, c1)
    lo_r = torch.maximum(r0[:, None], r0[None, :])
    hi_r = torch.maximum(torch.minimum(r1[:, None], r1[None, :]), lo_r)
    lo_c = torch.maximum(c0[:, None], c0[None, :])
    hi_c = torch.maximum(torch.minimum(c1[:, None], c1[None, :]), lo_c)
    pair = corners(lo_r, hi_r, lo_c, hi_c)
    return single.to(device), pair.to(device)


def _integral(u: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> flat integral image [B, C, (h + 1) (w + 1)]."""
    return F.pad(u.cumsum(2).cumsum(3), (1, 0, 1, 0)).flatten(2)


def _win(S: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Window sums [B, C, K] of the flat integral image S [B, C, L] at shared corners idx [4, K]."""
    return (S.index_select(2, idx[0]) - S.index_select(2, idx[1])) - (S.index_select(2, idx[2]) - S.index_select(2, idx[3]))


def _win_per_sample(S: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Window sums [B, C, K] at per-sample corners idx [4, B, K]."""
    B, C, _ = S.shape

    def g(i):
        return S.gather(2, idx[i][:, None, :].expand(B, C, idx.shape[2]))

    return (g(0) - g(1)) - (g(2) - g(3))


def _margin_over_classes(D: torch.Tensor, y: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """D [B, C, ...] = count_y - count_c; returns min over c != y of D + adj: [B, ...]."""
    B, C = D.shape[:2]
    extra = (1,) * (D.dim() - 2)
    D = D + adj.view(B, C, *extra)
    mask = (torch.arange(C, device=D.device)[None, :] == y[:, None]).view(B, C, *extra)
    return D.masked_fill(mask, float("inf")).amin(dim=1)


@torch.no_grad()
def _worst_pair(u: torch.Tensor, y: torch.Tensor, ms: FeatureMaskSet, pairs: str, tie_adjust: bool):
    """(m1, m2) long [B] each and their margin [B] (module doc), searched without autograd."""
    B, C, h, w = u.shape
    single, pair = _corner_tables(ms, str(u.device))
    M = single.shape[1]
    d = u.gather(1, y.view(B, 1, 1, 1).expand(B, 1, h, w)) - u  # u_y - u_c
    Sd = _integral(d)
    D0 = d.sum(dim=(2, 3))  # [B, C]: T_y - T_c
    V = _win(Sd, single)  # [B, C, M]
    cls = torch.arange(C, device=u.device)
    adj = (cls[None, :] > y[:, None]).to(u.dtype) if tie_adjust else torch.zeros(B, C, dtype=u.dtype, device=u.device)
    if pairs == "greedy":
        one = _margin_over_classes(D0[:, :, None] - V, y, adj)  # [B, M]
        m1 = one.argmin(dim=1)
        idx = pair[:, m1, :]  # [4, B, M]: m1 ∩ m2 for every m2
        inter = _win_per_sample(Sd, idx)
        V1 = V.gather(2, m1.view(B, 1, 1).expand(B, C, 1))
        two = _margin_over_classes(D0[:, :, None] - V1 - V + inter, y, adj)  # [B, M]
        best, m2 = two.min(dim=1)
        return m1, m2, best
    best = torch.full((B,), float("inf"), dtype=u.dtype, device=u.device)
    arg = torch.zeros(B, dtype=torch.long, device=u.device)
    k = max(1, _CHUNK // max(1, B * C * M))
    for s in range(0, M, k):
        e = min(M, s + k)
        inter = _win(Sd, pair[:, s:e, :].reshape(4, -1)).view(B, C, e - s, M)
        D = D0[:, :, None, None] - V[:, :, s:e, None] - V[:, :, None, :] + inter
        mu = _margin_over_classes(D, y, adj).flatten(1)  # [B, k M]
        val, a = mu.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        arg = torch.where(better, a + s * M, arg)
    return arg // M, arg % M, best


def masked_worst_case(u: torch.Tensor, labels: torch.Tensor, mask_set: FeatureMaskSet, pairs: str = "greedy",
                      tie_adjust: bool = False):
    """The worst two-mask counts of evidence ``u`` [B, C, h, w] (float; ``mask_set.grid`` must be (h, w)).

    Returns ``(counts, margin, m1, m2)``: counts [B, C] = ``T - W(m1) - W(m2) + W(m1 ∩ m2)`` of the chosen pair,
    differentiable in ``u``; margin [B] (detached) = ``min_{c != y} (count_y - count_c + [c > y] if tie_adjust)``
    of that pair; m1, m2 long [B] mask indices (``mask_set.masks()`` order). ``pairs="all"``: the pair of smallest
    margin over all pairs (the exact worst case); ``"greedy"``: the worst single mask, then its worst partner (an
    upper bound of the exact worst margin). Raises ValueError for an unknown ``pairs`` or a map of another size.
    """
    if pairs not in MASKING_PAIRS:
        raise ValueError(f"pairs must be one of {', '.join(MASKING_PAIRS)}, got {pairs!r}")
    if u.dim() != 4 or tuple(u.shape[-2:]) != tuple(mask_set.grid):
        raise ValueError(f"evidence must be [B, C, {mask_set.grid[0]}, {mask_set.grid[1]}] for this mask set, got {tuple(u.shape)}")
    B, C, h, w = u.shape
    m1, m2, margin = _worst_pair(u.detach(), labels, mask_set, pairs, tie_adjust)
    single, pair = _corner_tables(mask_set, str(u.device))
    S = _integral(u)
    T = u.sum(dim=(2, 3))
    idx = torch.stack([single[:, m1], single[:, m2], pair[:, m1, m2]], dim=2)  # [4, B, 3]
    win = _win_per_sample(S, idx)  # [B, C, 3]
    counts = T - win[:, :, 0] - win[:, :, 1] + win[:, :, 2]
    return counts, margin, m1, m2


class DoubleMaskingLoss(torch.nn.Module):
    """``margin_weight * CE(worst masked evidence) + ce_weight * CE(clean evidence) + bce_weight * BCE`` (module doc).

    Args:
        geometry: the model's geometry; image_size: (H, W) training images; patch_sizes: sizes to be robust
            against (one feature mask set each, on the training map; the worst pair over all of them).
        evidence: ``"logits"`` (clamp(z, -clip, clip)) or ``"votes"`` (straight-through votes, temperature ``tau``).
        clip: > 0, the logits' clip (``LocalDoubleMasking(evidence="logits", clip=(-clip, clip))``).
        pairs: ``"greedy"`` or ``"all"`` (module doc).
        scale: the CE temperature ``s`` applied to evidence normalised into [-1, 1] (> 0).
        tau, margin_weight, ce_weight, bce_weight, bce_pos_weight, label_smoothing: as in BagCertLoss.

    Raises:
        ValueError: an unknown evidence kind or pairs rule, a clip or scale that is not > 0, a patch larger than
            the image.
    """

    def __init__(self, geometry: Geometry, image_size, patch_sizes=(5,), evidence="logits", clip=1.0, pairs="greedy",
                 scale=10.0, tau=1.0, margin_weight=1.0, ce_weight=1.0, bce_weight=1.0, bce_pos_weight=1.0,
                 label_smoothing=0.0):
        super().__init__()
        if evidence not in MASKING_EVIDENCE:
            raise ValueError(f"evidence must be one of {', '.join(MASKING_EVIDENCE)}, got {evidence!r}")
        if pairs not in MASKING_PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(MASKING_PAIRS)}, got {pairs!r}")
        if not float(clip) > 0 or not float(scale) > 0:
            raise ValueError(f"clip and scale must be > 0, got clip={clip!r}, scale={scale!r}")
        self.geometry, self.image_size = geometry, tuple(image_size)
        self.patch_sizes = [parse_patch_size(p) for p in patch_sizes]
        self.mask_sets = [feature_mask_set(geometry, self.image_size, p) for p in self.patch_sizes]
        self.evidence, self.clip, self.pairs, self.scale = evidence, float(clip), pairs, float(scale)
        self.tau = float(tau)
        self.margin_weight, self.ce_weight, self.bce_weight = float(margin_weight), float(ce_weight), float(bce_weight)
        self.bce_pos_weight, self.label_smoothing = float(bce_pos_weight), float(label_smoothing)

    def evidence_of(self, z: torch.Tensor) -> torch.Tensor:
        """The certifier's evidence of local logits z (float32): clipped logits or straight-through votes."""
        z = z.float()
        if self.evidence == "votes":
            return straight_through_votes(z, self.tau)
        return z.clamp(-self.clip, self.clip)

    def worst_case(self, u: torch.Tensor, labels: torch.Tensor):
        """(counts [B, C], margin [B]) of the worst pair over every training patch size (see masked_worst_case)."""
        counts = margin = None
        for ms in self.mask_sets:
            c, m, _, _ = masked_worst_case(u, labels, ms, self.pairs, tie_adjust=self.evidence == "votes")
            if counts is None:
                counts, margin = c, m
            else:
                worse = m < margin
                counts = torch.where(worse[:, None], c, counts)
                margin = torch.where(worse, m, margin)
        return counts, margin

    def forward(self, local_logits: torch.Tensor, labels: torch.Tensor, margin_weight=None):
        """Returns ``(loss, stats)`` like BagCertLoss: detached 0-dim loss terms and ``margin`` [B], the chosen
        pair's margin (> 0 on every sample the certifier certifies with ``pairs="all"``; with ``"greedy"`` an upper
        bound, so ``margin > 0`` can overcount)."""
        z = local_logits.float()
        B, C, h, w = z.shape
        mw = self.margin_weight if margin_weight is None else margin_weight
        u = self.evidence_of(z)
        norm = self.scale / (h * w * (self.clip if self.evidence == "logits" else 1.0))
        counts, margin = self.worst_case(u, labels)
        stats = {"margin": margin}
        loss = z.new_zeros(())
        if isinstance(mw, torch.Tensor) or mw > 0:
            l_mask = F.cross_entropy(counts * norm, labels, label_smoothing=self.label_smoothing)
            loss = loss + mw * l_mask
            stats["loss_masked"] = l_mask.detach()
        if self.ce_weight > 0:
            l_ce = F.cross_entropy(u.sum(dim=(2, 3)) * norm, labels, label_smoothing=self.label_smoothing)
            loss = loss + self.ce_weight * l_ce
            stats["loss_ce"] = l_ce.detach()
        if self.bce_weight > 0:
            l_bce = location_bce(z, labels, self.bce_pos_weight)
            loss = loss + self.bce_weight * l_bce
            stats["loss_bce"] = l_bce.detach()
        stats["loss"] = loss.detach()
        return loss, stats


def masking_loss(cfg, geometry: Geometry) -> DoubleMaskingLoss:
    """The :class:`DoubleMaskingLoss` of a training config's masking settings (``cfg.loss == "masking"``); the
    training loop warms its margin weight up as the bagcert loss's. Its ``stats["margin"]`` > 0 marks samples whose
    chosen pair keeps the label (greedy: an upper bound of the share certified)."""
    return DoubleMaskingLoss(
        geometry, (cfg.image_size, cfg.image_size), cfg.patch_sizes, evidence=cfg.masking_evidence,
        clip=cfg.masking_clip, pairs=cfg.masking_pairs, scale=cfg.masking_scale, tau=cfg.tau,
        margin_weight=cfg.margin_weight, ce_weight=cfg.ce_weight, bce_weight=cfg.bce_weight,
        bce_pos_weight=cfg.bce_pos_weight, label_smoothing=cfg.label_smoothing,
    )
