r"""Double masking on the local evidence map: PatchCleanser's recovery rule applied to a bagcert model's votes.

PatchCleanser (Xiang, Mahloujifar, Mittal, USENIX Security 2022) masks the *image* twice and needs one network
pass per pair of masks. PatchCURE's "secure pooling" (Xiang et al., USENIX Security 2024) applies the same rule to
the local map of a small-receptive-field backbone instead: masking a window of the map removes its evidence from
the class totals, so every masked prediction is read off window sums. Cost: one forward pass plus window sums.
Re-derived here for any bagcert model and its exact receptive-field geometry.

Evidence. ``u[c, l]`` for class c at location l of the ``h x w`` map: the votes ``1[z[c, l] > 0]``
(``evidence="votes"``, exact integer arithmetic) or the clipped local logits ``clip(z[c, l], low, high)``
(``evidence="logits"``, float64; the clip must be finite, see "Ties" below; it may be negative: nothing here
needs non-negative evidence). Class evidence outside a set A of
locations: ``count_c(not A) = T_c - sum_{l in A} u[c, l]`` with ``T_c = sum_l u[c, l]``. Prediction from counts:
argmax, ties to the lower class index (as everywhere in bagcert).

Mask set (:class:`FeatureMaskSet`, :func:`feature_mask_set`). A patch at pixel position p changes only the
locations R(p) (``Geometry.affected_ranges``), a rectangle of at most ``ah`` rows and ``aw`` columns of the map.
The masks are windows of the map; the set is *R-covering* when every R(p) lies inside at least one mask.
Default: every ``ah x aw`` window fully inside the map (stride 1): ``(h - ah + 1) (w - aw + 1)`` masks (576 for
the default model's 32 x 32 map and a 5 x 5 patch, 9 x 9 windows). With ``k`` masks per axis the windows are
PatchCleanser's (:func:`~bagcert.peers.mask_axis` applied to the map: side ``ah + s - 1`` at stride
``s = ceil((h - ah + 1) / k)``, the last one moved back inside), fewer and larger. A clipped R(p) at the border
is shorter than ``ah`` and lies inside a full-size window too. Coverage is checked against every distinct
affected range of the geometry when the set is built.

One-mask and two-mask predictions. For masks m1, m2 (m1 = m2 allowed):

    count_c(m1)     = T_c - W_c(m1)
    count_c(m1, m2) = T_c - W_c(m1) - W_c(m2) + W_c(m1 ∩ m2)        (inclusion-exclusion on the union)

with ``W_c(A)`` the evidence of c summed over the window A (integral images; ``m1 ∩ m2`` is again a window,
empty for disjoint masks).

Defended prediction (PatchCleanser's Algorithm 1, the double-masking inference):
  1. ŷ_m = argmax count(m) for every mask; ``y_maj`` = the most frequent ŷ_m (ties to the lower class). If every
     ŷ_m equals y_maj, return it.
  2. Otherwise, for each disagreeing mask m1 (ŷ_m1 != y_maj): if ``argmax count(m1, m2) = ŷ_m1`` for every m2,
     return ŷ_m1. (Two such masks m1, m1' always carry the same label, because ``count(m1, m1')`` is one
     prediction that both second rounds contain; so the mask order PatchCleanser checks them in does not matter.)
  3. Otherwise return y_maj.

Certificate (two-mask correctness). Certified iff ``argmax count(m1, m2) = y`` for every pair (m1, m2), m1 = m2
included, where y is the prediction above (then every one-mask prediction is y, so step 1 returns y).
Soundness, following PatchCleanser's proof: let a patch at p change the map into u'; only locations in R(p)
change (nothing changes when R(p) is empty), and some mask m* contains R(p). Every count that removes m* is unchanged: ``count'(m*, m) = count(m*, m)``
for every m (and ``count'(m*) = count(m*)``), because the union of the masks holds every changed location.
  (i)  ŷ'_m* = y.
  (ii) A mask m1 with ŷ'_m1 != y is never returned in step 2: its second round contains
       ``argmax count'(m1, m*) = argmax count(m1, m*) = y != ŷ'_m1``.
  (iii) If y'_maj != y, then m* disagrees with y'_maj and its whole second round is ``count'(m*, m) =
       count(m*, m)``, all predicting y; so step 2 returns (at m* or at another mask, which by (ii) predicts y) y.
  (iv) If y'_maj = y, step 1 or 3 returns y, and step 2 can return only y by (ii).
So the prediction on u' is y for every patch position. Nothing here needs a bound on what the patch writes into
R(p): the evidence inside m* is removed, whatever it is.

Ties. ``argmax count(m1, m2) = y`` means ``count_y - count_c > 0`` for c < y and ``>= 0`` for c > y (ties go to
the lower index). Votes: ``margin = min over pairs and c != y of (count_y - count_c + [c > y])``, an integer,
certified iff margin > 0. Floats: certified iff ``min (count_y - count_c) > tol`` with
``tol = 1e-9 * max(1, h * w * max(|low|, |high|))``: strictly positive and above the rounding of float64 window
sums of evidence bounded by the clip (a patch cannot write a value beyond the clip, so the sums it perturbs stay
within that rounding, and an exact tie is never certified).

Efficiency (one pass, then per image ~M^2 / 2 pairs, 166k for M = 576, but never enumerated):
  * one-mask counts: ``T - W(m)`` for all masks, one integral image;
  * disjoint pairs (no intersection term): with ``V_c = W_y - W_c`` and ``Δ_c = T_y - T_c``, the worst pair of
    m1 is ``Δ_c - V_c(m1) - max_{m2 disjoint from m1} V_c(m2)``; masks are disjoint iff their rows or their
    columns are, and those m2 form a prefix or a suffix of the mask rows (columns), so the maximum is a prefix /
    suffix running maximum of the per-row (per-column) maxima;
  * overlapping pairs: a bound first, ``count_y - count_c >= Δ_c - P_c(m1) - max_{m2 near m1} V_c(m2)`` with
    ``P_c(m1)`` the positive part of ``u_y - u_c`` summed over m1 (because ``V(m1) - V(m1 ∩ m2) <= P(m1)``), the
    maximum a sliding maximum over the overlap neighbourhood (index distance below the overlap reach); only (sample, class) rows the bound cannot decide are
    evaluated exactly over the precomputed list of overlapping pairs (their intersection windows);
  * step 2 of the prediction: the same disjoint-pair reduction per disagreeing label; an upper bound
    ``count_t - count_c <= Δ - V(m1) + P(m1) - max_{m2 near m1} V(m2)`` rejects most of the remaining masks;
    only the rest are evaluated exactly on their overlap neighbourhood;
  * memory stays bounded (``_CHUNK`` elements per [samples, C, M] intermediate): many classes are certified in
    chunks of samples.
With ``exact_margin=True`` every row is evaluated exactly and ``margin`` is the exact smallest two-mask margin;
by default it is that margin where a row was evaluated exactly and otherwise a lower bound of it (the bound
that decided the row), so ``margin > 0`` iff certified either way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..inference import evaluate_local_logits
import torch.nn.functional as F

from ..certification import CertResult
from ..geometry import Geometry, normalize_image_size, parse_patch_size
from ..geometry_inference import verify_geometry
from .base import PeerCertifier, as_classifier, check_images_for_peer, check_labels, make_result
from .patchcleanser import mask_axis

__all__ = [
    "FeatureMaskSet",
    "LocalDoubleMasking",
    "double_masking_certify_evidence",
    "double_masking_predict",
    "check_coverage",
    "feature_mask_set",
]

EVIDENCE_KINDS = ("votes", "logits")
_NEG = float("-inf")
_CHUNK = 1 << 24  # elements of the largest [samples or rows, C, M] intermediate; larger inputs are chunked


# ------------------------------------------------------------------------------------------------
# the mask set on the map
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureMaskSet:
    """Windows of an ``h x w`` evidence map that cover every affected set R(p) of one patch size.

    Mask ``i * len(col_starts) + j`` covers map rows ``row_starts[i] .. + mask_size[0] - 1`` and columns
    ``col_starts[j] .. + mask_size[1] - 1`` (inclusive, inside the map). ``footprint`` is the largest number of
    affected rows / columns of the patch; ``k`` None for the default (every window at stride 1) or the masks per
    axis (PatchCleanser's construction on the map). Build with :func:`feature_mask_set`.
    """

    grid: tuple[int, int]
    footprint: tuple[int, int]
    mask_size: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    k: tuple[int, int] | None = None

    @property
    def num_masks(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def masks(self, device=None) -> torch.Tensor:
        """bool [M, h, w], True = masked."""
        h, w = self.grid
        mh, mw = self.mask_size
        r, c = torch.arange(h, device=device), torch.arange(w, device=device)
        rs, cs = torch.tensor(self.row_starts, device=device), torch.tensor(self.col_starts, device=device)
        row_in = (r[None] >= rs[:, None]) & (r[None] < rs[:, None] + mh)
        col_in = (c[None] >= cs[:, None]) & (c[None] < cs[:, None] + mw)
        return (row_in[:, None, :, None] & col_in[None, :, None, :]).reshape(-1, h, w)

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "footprint": list(self.footprint), "mask_size": list(self.mask_size),
                "num_masks": self.num_masks, "row_starts": list(self.row_starts), "col_starts": list(self.col_starts),
                "k": None if self.k is None else list(self.k)}


def _axis_masks(g: int, a: int, k: int | None) -> tuple[int, tuple[int, ...]]:
    if k is None:
        return a, tuple(range(g - a + 1))
    m, _, starts = mask_axis(g, a, k)
    return m, starts


@functools.lru_cache(maxsize=256)
def _mask_set(geometry: Geometry, image_size: tuple[int, int], patch_size: tuple[int, int], k) -> FeatureMaskSet:
    h, w = geometry.grid_size(*image_size)
    rows, cols = geometry.affected_ranges(image_size, patch_size)
    ah = max(1, min(h, int((rows[:, 1] - rows[:, 0] + 1).max())))
    aw = max(1, min(w, int((cols[:, 1] - cols[:, 0] + 1).max())))
    kr, kc = (None, None) if k is None else k
    mh, rs = _axis_masks(h, ah, kr)
    mw, cs = _axis_masks(w, aw, kc)
    ms = FeatureMaskSet((h, w), (ah, aw), (mh, mw), rs, cs, k)
    check_coverage(ms, geometry, image_size, patch_size)  # every distinct affected range (empty ones need no mask)
    return ms


def _check_k(k):
    """None, or k as (rows, cols) of ints >= 1; ValueError otherwise."""
    if k is None:
        return None
    kk = (k, k) if isinstance(k, int) and not isinstance(k, bool) else tuple(k) if isinstance(k, (tuple, list)) else ()
    if len(kk) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in kk):
        raise ValueError(f"k must be None, a positive int or (rows, cols) of positive ints, got {k!r}")
    return int(kk[0]), int(kk[1])


def check_coverage(mask_set: FeatureMaskSet, geometry: Geometry, image_size, patch_size) -> None:
    """Raise ValueError unless every affected set R(p) of ``patch_size`` lies inside some mask of ``mask_set``."""
    rows, cols = geometry.affected_ranges(normalize_image_size(image_size), parse_patch_size(patch_size))
    mh, mw = mask_set.mask_size
    for ranges, starts, m, axis in ((rows, mask_set.row_starts, mh, "rows"), (cols, mask_set.col_starts, mw, "columns")):
        st = torch.tensor(starts)
        for lo, hi in torch.unique(ranges, dim=0).tolist():
            if hi >= lo and not bool(((st <= lo) & (st + m - 1 >= hi)).any()):
                ph, pw = parse_patch_size(patch_size)
                raise ValueError(f"the mask set ({mask_set.num_masks} masks of {mh}x{mw} locations) does not cover a "
                                 f"{ph}x{pw} patch (affected {axis} {lo}..{hi}); build it for a patch at least this large")


def feature_mask_set(geometry: Geometry, image_size, patch_size, k=None) -> FeatureMaskSet:
    """The R-covering mask set of ``patch_size`` (int or (h, w) pixels) on the map of ``image_size`` (H, W) images.

    ``k``: None (default: every window of the largest affected rows x columns, stride 1) or masks per axis (int or
    (rows, cols) >= 1: PatchCleanser's ``mask_axis`` on the map, larger masks at a stride). Cached.

    Raises:
        ValueError: a patch larger than the image, a geometry that gives no map for ``image_size``, or k < 1.
    """
    H, W = normalize_image_size(image_size)
    ph, pw = parse_patch_size(patch_size)
    if ph > H or pw > W:
        raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image")
    k = _check_k(k)
    h, w = geometry.grid_size(H, W)
    if h < 1 or w < 1:
        raise ValueError(f"the geometry gives no locations for {H}x{W} images")
    return _mask_set(geometry, (H, W), (ph, pw), k)


# ------------------------------------------------------------------------------------------------
# index tables of a mask set (flat indices into an integral image of (h + 1) x (w + 1))
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tables:
    lo_r: torch.Tensor  # long [n_r]: last mask row fully above (disjoint from) mask row a, -1 if none
    hi_r: torch.Tensor  # long [n_r]: first mask row fully below mask row a, n_r if none
    lo_c: torch.Tensor
    hi_c: torch.Tensor
    reach: tuple[int, int]  # largest index distance (rows, cols) at which two masks can overlap
    pair_m1: torch.Tensor  # long [P]: overlapping pairs m1 < m2
    pair_m2: torch.Tensor
    pair_corners: torch.Tensor  # long [4, P]: corners of m1 ∩ m2
    nbr: torch.Tensor  # long [M, K]: neighbours m2 (m1 itself where the offset leaves the set)
    nbr_corners: torch.Tensor  # long [4, M, K]: corners of m1 ∩ nbr


def _corners(r0, r1, c0, c1, w):
    """Flat integral-image indices [4, ...] (corners ++, -+, +-, --) of the windows rows [r0, r1) x cols [c0, c1)
    (empty when r1 <= r0 or c1 <= c0)."""
    r1 = torch.maximum(r1, r0)
    c1 = torch.maximum(c1, c0)
    W1 = w + 1
    return torch.stack([r1 * W1 + c1, r0 * W1 + c1, r1 * W1 + c0, r0 * W1 + c0])


def _axis_tables(starts, m):
    st = torch.tensor(starts, dtype=torch.long)
    lo = torch.searchsorted(st, st - m, right=True) - 1  # last start t2 <= t - m
    hi = torch.searchsorted(st, st + m, right=False)  # first start t2 >= t + m
    d = (st[None] - st[:, None]).abs()
    ov = d < m
    idx = torch.arange(len(starts))
    reach = int((idx[None] - idx[:, None]).abs()[ov].max())
    return st, lo, hi, ov, reach


@functools.lru_cache(maxsize=16)
def _tables(ms: FeatureMaskSet, device: str) -> _Tables:
    h, w = ms.grid
    mh, mw = ms.mask_size
    sr, lo_r, hi_r, ov_r, kr = _axis_tables(ms.row_starts, mh)
    sc, lo_c, hi_c, ov_c, kc = _axis_tables(ms.col_starts, mw)
    nr, nc = len(sr), len(sc)
    # overlapping unordered pairs m1 < m2
    a1, a2 = torch.nonzero(ov_r, as_tuple=True)
    b1, b2 = torch.nonzero(ov_c, as_tuple=True)
    A1, B1 = a1[:, None].expand(-1, len(b1)).reshape(-1), b1[None, :].expand(len(a1), -1).reshape(-1)
    A2, B2 = a2[:, None].expand(-1, len(b2)).reshape(-1), b2[None, :].expand(len(a2), -1).reshape(-1)
    m1, m2 = A1 * nc + B1, A2 * nc + B2
    keep = m1 < m2
    A1, B1, A2, B2, m1, m2 = (t[keep] for t in (A1, B1, A2, B2, m1, m2))
    pc = _corners(torch.maximum(sr[A1], sr[A2]), torch.minimum(sr[A1], sr[A2]) + mh,
                  torch.maximum(sc[B1], sc[B2]), torch.minimum(sc[B1], sc[B2]) + mw, w)
    # neighbourhood of every mask: index offsets within the overlap reach
    da = torch.arange(-kr, kr + 1)
    db = torch.arange(-kc, kc + 1)
    DA, DB = da[:, None].expand(-1, len(db)).reshape(-1), db[None, :].expand(len(da), -1).reshape(-1)
    ia = torch.arange(nr)[:, None, None] + DA.view(1, 1, -1)  # [nr, 1, K]
    ib = torch.arange(nc)[None, :, None] + DB.view(1, 1, -1)  # [1, nc, K]
    ia, ib = ia.expand(nr, nc, -1), ib.expand(nr, nc, -1)
    valid = (ia >= 0) & (ia < nr) & (ib >= 0) & (ib < nc)
    self_a = torch.arange(nr)[:, None, None].expand_as(ia)
    self_b = torch.arange(nc)[None, :, None].expand_as(ib)
    ia, ib = torch.where(valid, ia, self_a), torch.where(valid, ib, self_b)  # outside the set: the mask itself
    nbr = (ia * nc + ib).reshape(nr * nc, -1)
    A, B = self_a.reshape(nr * nc, -1), self_b.reshape(nr * nc, -1)
    IA, IB = ia.reshape(nr * nc, -1), ib.reshape(nr * nc, -1)
    ncn = _corners(torch.maximum(sr[A], sr[IA]), torch.minimum(sr[A], sr[IA]) + mh,
                   torch.maximum(sc[B], sc[IB]), torch.minimum(sc[B], sc[IB]) + mw, w)
    dev = torch.device(device)
    return _Tables(lo_r.to(dev), hi_r.to(dev), lo_c.to(dev), hi_c.to(dev), (kr, kc),
                   m1.to(dev), m2.to(dev), pc.to(dev), nbr.to(dev), ncn.to(dev))


def _integral_flat(x: torch.Tensor) -> torch.Tensor:
    """[..., h, w] -> [..., (h + 1) (w + 1)] integral image, zero first row / column."""
    return _integral(x).flatten(-2)


def _win(S: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Window sums from a flat integral image S [..., L] and corners [4, *shape] -> [..., *shape]."""
    shape = corners.shape[1:]
    flat = corners.reshape(4, -1)
    g = [S.index_select(-1, flat[i]) for i in range(4)]
    out = g[0] - g[1] - g[2] + g[3]
    return out.reshape(*S.shape[:-1], *shape)


def _integral(x: torch.Tensor) -> torch.Tensor:
    """[..., h, w] -> [..., h + 1, w + 1] integral image with a zero first row / column."""
    h, w = x.shape[-2:]
    S = torch.zeros(*x.shape[:-2], h + 1, w + 1, dtype=x.dtype, device=x.device)
    S[..., 1:, 1:] = x.cumsum(-2).cumsum(-1)
    return S


def _axis_diff(S: torch.Tensor, dim: int, starts: tuple, m: int) -> torch.Tensor:
    """S[start + m] - S[start] along ``dim`` for every start: slices for consecutive starts, else index_select."""
    n = len(starts)
    if starts == tuple(range(starts[0], starts[0] + n)):
        return S.narrow(dim, starts[0] + m, n) - S.narrow(dim, starts[0], n)
    st = torch.tensor(starts, device=S.device)
    return S.index_select(dim, st + m) - S.index_select(dim, st)


def _grid_windows(x: torch.Tensor, ms: FeatureMaskSet, S: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of x [..., h, w] over every mask of ``ms`` -> [..., M], separably from a 2-D cumulative sum
    (``S``: the integral image of x, when already made)."""
    if S is None:
        S = _integral(x)
    Rr = _axis_diff(S, S.dim() - 2, ms.row_starts, ms.mask_size[0])  # [..., nr, w + 1]
    return _axis_diff(Rr, Rr.dim() - 1, ms.col_starts, ms.mask_size[1]).flatten(-2)  # [..., nr * nc]


def _sliding_max(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Maximum of every window of n consecutive entries along ``dim`` (length L -> L - n + 1), in about log2(n)
    elementwise maxima (windows of doubling length, then two overlapping ones)."""
    p, w = x, 1
    while 2 * w <= n:
        L = p.shape[dim]
        p = torch.maximum(p.narrow(dim, 0, L - w), p.narrow(dim, w, L - w))  # p[i] = max x[i : i + 2w]
        w *= 2
    out = x.shape[dim] - n + 1
    return torch.maximum(p.narrow(dim, 0, out), p.narrow(dim, n - w, out))


def _near_max(X: torch.Tensor, nr: int, nc: int, reach: tuple[int, int]) -> torch.Tensor:
    """max of X [..., M] over the masks within ``reach`` (index distance per axis) of every mask -> [..., M]."""
    kr, kc = reach
    Y = X.reshape(*X.shape[:-1], nr, nc)
    Y = _sliding_max(F.pad(Y, (0, 0, kr, kr), value=_NEG), 2 * kr + 1, Y.dim() - 2)
    Y = _sliding_max(F.pad(Y, (kc, kc), value=_NEG), 2 * kc + 1, Y.dim() - 1)
    return Y.reshape(X.shape)


def _disjoint_max(V: torch.Tensor, nr: int, nc: int, t: _Tables) -> torch.Tensor:
    """max over masks m2 disjoint from m1 of V(m2), for every m1: V [R, M] -> [R, M] (-inf where none)."""
    R = V.shape[0]
    V2 = V.view(R, nr, nc)
    neg = torch.full((R, 1), _NEG, dtype=V.dtype, device=V.device)

    def along(mx, lo, hi):  # mx [R, n]: best of the prefix ending at lo and the suffix starting at hi
        pre = torch.cat([neg, mx.cummax(dim=1).values], dim=1)  # pre[:, i + 1] = max mx[:, :i + 1]
        suf = torch.cat([mx.flip(1).cummax(dim=1).values.flip(1), neg], dim=1)  # suf[:, i] = max mx[:, i:]
        return torch.maximum(pre.index_select(1, lo + 1), suf.index_select(1, hi))

    rows = along(V2.amax(dim=2), t.lo_r, t.hi_r)  # [R, nr]
    cols = along(V2.amax(dim=1), t.lo_c, t.hi_c)  # [R, nc]
    return torch.maximum(rows[:, :, None], cols[:, None, :]).reshape(R, nr * nc)


# ------------------------------------------------------------------------------------------------
# the defended prediction
# ------------------------------------------------------------------------------------------------
def _argmax_tie_low(x: torch.Tensor, dim: int) -> torch.Tensor:
    """argmax along ``dim``, ties to the lower index. For few classes along a non-last dim a running maximum
    (strict ``>``, so the first maximum stays) is faster than a strided reduction."""
    if dim == x.dim() - 1 or x.shape[dim] > 32:
        return x.argmax(dim=dim)  # torch returns the first maximum
    best = x.select(dim, 0)
    idx = torch.zeros(best.shape, dtype=torch.long, device=x.device)
    for c in range(1, x.shape[dim]):
        xc = x.select(dim, c)
        idx = torch.where(xc > best, c, idx)
        best = torch.maximum(best, xc)
    return idx


def _prepare(evidence: torch.Tensor, exact: bool | None = None):
    """(evidence in the working dtype, exact): integer-valued evidence (votes) is exact; ``exact`` None decides
    from the values."""
    if exact is None:
        exact = not evidence.is_floating_point() or bool((evidence == evidence.round()).all())
    # votes: integer counts, exact in float32 (|sums| <= 2 h w < 2^24); other evidence: float64
    dt = torch.float32 if exact and evidence.shape[-2] * evidence.shape[-1] < 2**22 else torch.float64
    return evidence.to(dt), exact


def _predict(u: torch.Tensor, ms: FeatureMaskSet):
    """Returns (prediction [N], integral S [N, C, L], window sums W [N, C, M], totals T [N, C], tables)."""
    N, C, h, w = u.shape
    t = _tables(ms, str(u.device))
    nr, nc = len(ms.row_starts), len(ms.col_starts)
    M = nr * nc
    S2 = _integral(u)
    W = _grid_windows(u, ms, S2)  # [N, C, M]
    S = S2.flatten(-2)  # [N, C, L]
    T = S[..., -1]  # [N, C]
    one = _argmax_tie_low(T[:, :, None] - W, dim=1)  # [N, M] first-round predictions
    hist = torch.zeros(N, C, dtype=torch.long, device=u.device).scatter_add_(1, one, torch.ones_like(one))
    maj = _argmax_tie_low(hist, dim=1)
    pred = maj.clone()
    dis = one != maj[:, None]
    todo = torch.nonzero(dis.any(dim=1)).flatten()
    if todo.numel() == 0:
        return pred, S, W, T, t
    # step 2: per sample and candidate label c' (a label some disagreeing mask predicts), the disjoint second
    # rounds of every mask at once; then the overlapping neighbours of the masks that survive.
    present = torch.zeros(len(todo), C, dtype=torch.bool, device=u.device)
    present.scatter_(1, one[todo], dis[todo])
    rs, labs_all = torch.nonzero(present, as_tuple=True)  # rows (sample in todo, target label)
    step = max(1, _CHUNK // (C * max(M, h * w)))
    for s0 in range(0, rs.numel(), step):  # bounded memory: rows are [C, M] each
        _second_round(u, S, W, T, t, ms, todo[rs[s0 : s0 + step]], labs_all[s0 : s0 + step], one, pred)
    return pred, S, W, T, t


def _second_round(u, S, W, T, t: _Tables, ms: FeatureMaskSet, n_idx, labs, one, pred) -> None:
    """Step 2 for the rows (sample ``n_idx``, label ``labs``): set ``pred`` of every sample that has a mask with
    that one-mask label whose whole second round agrees with it."""
    N, C, h, w = u.shape
    nr, nc = len(ms.row_starts), len(ms.col_starts)
    M = nr * nc
    Wn, Tn = W[n_idx], T[n_idx]  # [R, C, M], [R, C]
    Wt = Wn.gather(1, labs.view(-1, 1, 1).expand(-1, 1, M))  # [R, 1, M]
    Tt = Tn.gather(1, labs.view(-1, 1))  # [R, 1]
    V = Wt - Wn  # [R, C, M]
    D0 = Tt - Tn  # [R, C]
    R = V.shape[0]
    md = _disjoint_max(V.reshape(R * C, M), nr, nc, t).view(R, C, M)
    cls = torch.arange(C, device=u.device)
    worst = D0[:, :, None] - V - md  # [R, C, M] count_t - count_c of the worst disjoint pair of each m1
    # argmax ties go to the lower class: c > t may tie with t, c < t must lose (c = t: D0 = V = 0, passes)
    ok_disj = torch.where((cls[None, :] >= labs[:, None])[:, :, None], worst >= 0, worst > 0).all(dim=1)  # [R, M]
    cand = ok_disj & (one[n_idx] == labs[:, None])  # masks predicting the label whose disjoint rounds agree
    if not bool(cand.any()):
        return
    # overlapping neighbours. A sure failure first: count_t - count_c = Δ - V(m1) - V(m2) + V(m1 ∩ m2)
    # <= Δ - V(m1) + P(m1) - V(m2) (as V(m1 ∩ m2) <= P(m1), the positive part of u_t - u_c summed over m1); if that
    # is below the tie rule's threshold for the best m2 near m1, m1's second round disagrees. The rest are
    # evaluated exactly on their neighbourhood.
    live = torch.nonzero(cand.any(dim=1)).flatten()
    d = u[n_idx[live]].gather(1, labs[live].view(-1, 1, 1, 1).expand(-1, 1, h, w)) - u[n_idx[live]]
    Pm = _grid_windows(d.clamp(min=0), ms)  # [R', C, M]
    ub = D0[live][:, :, None] - V[live] + Pm - _near_max(V[live], nr, nc, t.reach)
    fail = torch.where((cls[None, :] >= labs[live][:, None])[:, :, None], ub < 0, ub <= 0).any(dim=1)  # [R', M]
    rest = cand.clone()
    rest[live] &= ~fail
    ri, mi = torch.nonzero(rest, as_tuple=True)
    if ri.numel():
        n_c, lab_c = n_idx[ri], labs[ri]
        Wp = W.transpose(1, 2)  # [N, M, C]
        Sp = S.transpose(1, 2)  # [N, L, C]
        passed = torch.zeros(ri.numel(), dtype=torch.bool, device=u.device)
        step = max(1, 4_000_000 // max(1, C * t.nbr.shape[1]))
        for s in range(0, ri.numel(), step):
            n, m1 = n_c[s : s + step], mi[s : s + step]
            nb, cor = t.nbr[m1], t.nbr_corners[:, m1]  # [k, K], [4, k, K]
            nn = n[:, None]
            inter = Sp[nn, cor[0]] - Sp[nn, cor[1]] - Sp[nn, cor[2]] + Sp[nn, cor[3]]  # [k, K, C]
            counts = T[n][:, None, :] - Wp[n, m1][:, None, :] - Wp[nn, nb] + inter
            passed[s : s + step] = (counts.argmax(dim=2) == lab_c[s : s + step][:, None]).all(dim=1)
        if passed.any():
            pred[n_c[passed]] = lab_c[passed]  # all passing masks of a sample carry the same label


def _check_evidence(evidence, geometry, image_size, patch_size):
    if not isinstance(evidence, torch.Tensor) or evidence.dim() != 4:
        raise ValueError("evidence must be a tensor [N, C, h, w]")
    N, C, h, w = evidence.shape
    if N == 0:
        raise ValueError("evidence holds no samples; expected [N, C, h, w] with N >= 1")
    if C < 2:
        raise ValueError(f"need at least 2 classes to certify, got {C}")
    if evidence.is_floating_point() and not torch.isfinite(evidence).all():
        raise ValueError("evidence contains NaN or Inf")
    H, W = normalize_image_size(image_size)
    if geometry.grid_size(H, W) != (h, w):
        raise ValueError(f"evidence map is {h}x{w} but the geometry gives {geometry.grid_size(H, W)} for {H}x{W} images")
    ph, pw = parse_patch_size(patch_size)
    if ph > H or pw > W:
        raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image")
    return (H, W), (ph, pw)


@torch.no_grad()
def double_masking_predict(evidence: torch.Tensor, mask_set: FeatureMaskSet) -> torch.Tensor:
    """The double-masking prediction (module doc, steps 1-3) of an evidence map [N, C, h, w] (votes in {0, 1},
    integer counts, or bounded float evidence) with ``mask_set`` (its grid must be (h, w)): int64 [N], ties to
    the lower class index. Raises ValueError for a map that does not match the mask set."""
    if not isinstance(evidence, torch.Tensor) or evidence.dim() != 4 or tuple(evidence.shape[-2:]) != mask_set.grid:
        got = tuple(evidence.shape) if isinstance(evidence, torch.Tensor) else type(evidence).__name__
        raise ValueError(f"evidence must be [N, C, {mask_set.grid[0]}, {mask_set.grid[1]}] for this mask set, got {got}")
    u, _ = _prepare(evidence)
    N, C = u.shape[:2]
    step = max(1, _CHUNK // (C * max(mask_set.num_masks, u.shape[-2] * u.shape[-1])))
    return torch.cat([_predict(u[s : s + step], mask_set)[0] for s in range(0, N, step)])


@torch.no_grad()
def double_masking_certify_evidence(
    evidence: torch.Tensor,
    labels,
    geometry: Geometry,
    image_size,
    patch_size,
    *,
    k=None,
    mask_patch_size=None,
    clip_bound: float | None = None,
    exact_margin: bool = False,
    name: str = "double-masking-votes",
) -> CertResult:
    """Double-masking prediction and certificate from an evidence map (module doc).

    Args:
        evidence: [N, C, h, w]: votes in {0, 1} (any dtype; exact integer arithmetic) or float evidence bounded by
            ``clip_bound`` in absolute value (clipped local logits); ``(h, w)`` = ``geometry.grid_size(*image_size)``.
        labels: int64 [N] in [0, C), or None.
        geometry, image_size (H, W) pixels, patch_size (int or (h, w) pixels, at most the image).
        k: the mask set (:func:`feature_mask_set`): None = every footprint-sized window, or masks per axis.
        mask_patch_size: build the mask set for this patch instead of ``patch_size`` (one mask set, hence one
            prediction, for several sizes); it must cover ``patch_size`` (ValueError otherwise).
        clip_bound: for float evidence, the largest |value| a patch can write (the clip); sets the tolerance.
        exact_margin: evaluate every overlapping pair exactly, so ``margin`` is the exact smallest two-mask margin.
        name: written into ``CertResult.aggregation``.

    Returns a ``CertResult``: prediction int64 [N], certified bool [N] (every two-mask prediction equals it),
    margin [N] (votes: int64 ``min (count_y - count_c + [c > y])``; floats: float64 ``min (count_y - count_c)``;
    > 0 iff certified; a lower bound unless ``exact_margin``), worst_position zeros (not position-bound).

    Raises:
        ValueError: evidence that is not [N, C, h, w] with N >= 1, C >= 2, finite and matching the geometry;
            float evidence that is not votes without ``clip_bound`` or beyond it; a patch larger than the image;
            labels of the wrong shape or outside [0, C); a bad ``k``.
    """
    (H, W), (ph, pw) = _check_evidence(evidence, geometry, image_size, patch_size)
    N, C, h, w = evidence.shape
    labels = check_labels(labels, N, evidence.device)
    if labels is not None and int(labels.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C})")
    ms = feature_mask_set(geometry, (H, W), (ph, pw) if mask_patch_size is None else mask_patch_size, k)
    if mask_patch_size is not None:
        check_coverage(ms, geometry, (H, W), (ph, pw))
    exact = clip_bound is None
    if exact and evidence.is_floating_point() and not bool((evidence == evidence.round()).all()):
        raise ValueError("evidence without clip_bound must be integer-valued (votes in {0, 1}); for float evidence "
                         "give the clip_bound (the largest |value| a patch can write)")
    u, exact = _prepare(evidence, exact)
    if not exact:
        if clip_bound is None or not math.isfinite(clip_bound):
            raise ValueError("float evidence needs a finite clip_bound (the largest |value| a patch can write): clip the "
                             "local logits, e.g. LocalDoubleMasking(evidence='logits', clip=(-1, 1))")
        if float(u.abs().max()) > clip_bound:
            raise ValueError(f"evidence exceeds clip_bound {clip_bound}")
    tol = 0.0 if exact else 1e-9 * max(1.0, h * w * float(clip_bound))
    step = max(1, _CHUNK // (C * max(ms.num_masks, h * w)))  # bounded memory for many classes (ImageNet)
    preds, margins = [], []
    for s0 in range(0, N, step):
        uc = u[s0 : s0 + step]
        pred_c, S, Wm, T, t = _predict(uc, ms)
        margins.append(_certify(uc, S, Wm, T, t, ms, pred_c, exact, exact_margin, tol))
        preds.append(pred_c)
    pred, margin = torch.cat(preds), torch.cat(margins)
    if exact:
        margin = margin.round().long()
    certified = margin > tol
    return make_result(pred, labels, certified, margin, (ph, pw), name)


def _certify(u, S, W, T, t: _Tables, ms: FeatureMaskSet, y, exact: bool, exact_margin: bool, tol: float) -> torch.Tensor:
    """The margin [N] of the prediction y over every mask pair (tie-adjusted for exact evidence; certified iff
    > ``tol``), exact where a row is evaluated exactly, else the lower bound that decided the row."""
    N, C, h, w = u.shape
    nr, nc = len(ms.row_starts), len(ms.col_starts)
    M = nr * nc
    dev = u.device
    Wy = W.gather(1, y.view(N, 1, 1).expand(N, 1, M))
    V = (Wy - W).reshape(N * C, M)  # V_c(m) = W_y(m) - W_c(m)
    D0 = (T.gather(1, y.view(N, 1)) - T).reshape(N * C, 1)  # Δ_c
    cls = torch.arange(C, device=dev)
    adj = (cls[None, :] > y[:, None]).to(u.dtype).reshape(N * C, 1) if exact else torch.zeros(N * C, 1, dtype=u.dtype, device=dev)
    competitor = (cls[None, :] != y[:, None]).reshape(N * C)
    # one mask (m1 = m2) and disjoint pairs, exactly
    one = (D0 + adj - V).amin(dim=1)
    disj = (D0 + adj - V - _disjoint_max(V, nr, nc, t)).amin(dim=1)
    row_min = torch.minimum(one, disj)  # [N C]
    # overlapping pairs: count_y - count_c = Δ - V(m1) - V(m2) + V(m1 ∩ m2) >= Δ - P(m1) - max_{m2 near m1} V(m2),
    # with P(m1) the positive part of u_y - u_c summed over m1 (V(m1) - V(m1 ∩ m2) = V(m1 \ m2) <= P(m1))
    if t.pair_m1.numel():
        d = u.gather(1, y.view(N, 1, 1, 1).expand(N, 1, h, w)) - u  # [N, C, h, w]
        P = _grid_windows(d.clamp(min=0), ms).reshape(N * C, M)
        bound = (D0 + adj - P - _near_max(V, nr, nc, t.reach)).amin(dim=1)
        fails = torch.where(competitor, row_min, torch.full_like(row_min, float("inf"))).view(N, C).amin(1) <= tol
        # the bound settles the row, or the sample is already refused by one mask or a disjoint pair
        decided = (bound > tol) | fails.repeat_interleave(C)
        need = competitor & ~decided if not exact_margin else competitor
        ov = bound.clone()
        rows = torch.nonzero(need).flatten()
        if rows.numel():
            Sd = _integral_flat(d.reshape(N * C, h, w)[rows])  # [R, L]
            step = max(1, 8_000_000 // max(1, t.pair_m1.numel()))
            for s in range(0, rows.numel(), step):
                r = rows[s : s + step]
                Vr = V[r]
                inter = _win(Sd[s : s + step], t.pair_corners)  # [k, P]
                val = D0[r] + adj[r] - Vr.index_select(1, t.pair_m1) - Vr.index_select(1, t.pair_m2) + inter
                ov[r] = val.amin(dim=1)
        row_min = torch.minimum(row_min, ov)
    row_min = torch.where(competitor, row_min, torch.full_like(row_min, float("inf")))
    return row_min.view(N, C).amin(dim=1)


# ------------------------------------------------------------------------------------------------
# the certifier
# ------------------------------------------------------------------------------------------------
class LocalDoubleMasking(PeerCertifier):
    """Double masking (PatchCleanser's rule) on a bagcert model's local votes or clipped logits: one forward pass.

    Args:
        evidence: ``"votes"`` (default): ``1[local logit > 0]``, exact integer counts; ``"logits"``: the local
            logits clipped into ``clip``.
        clip: ``(low, high)`` finite, low < high; only with ``evidence="logits"`` (default ``(-1, 1)``). Any
            bounded evidence is sound, negative values included (the certificate removes the patch's evidence
            instead of bounding it); the bound only sets the float tolerance.
        k: None (default: every window of the largest affected set, stride 1) or masks per axis (int or
            (rows, cols)): PatchCleanser's larger strided masks on the map.
        exact_margin: see :func:`double_masking_certify_evidence`.
        batch_size: forward pass in chunks of this many images (default: all at once).
        mask_patch_size: None (default: the mask set of each certified patch size) or one patch size (int or (h, w)
            pixels) whose mask set serves every smaller size: one prediction for all of them (``certify.py
            --double-masking`` with several sizes uses the largest).

    ``name``: ``"double-masking-votes"`` / ``"double-masking-logits"``, ``-k<k>`` appended for a k mask set.

    Raises:
        ValueError: an unknown evidence kind, a clip with votes, a clip that is not finite with low < high, a bad k.
    """

    def __init__(self, evidence: str = "votes", clip=None, k=None, exact_margin: bool = False, batch_size: int | None = None,
                 mask_patch_size=None):
        if evidence not in EVIDENCE_KINDS:
            raise ValueError(f"evidence must be one of {', '.join(EVIDENCE_KINDS)}, got {evidence!r}")
        if evidence == "votes" and clip is not None:
            raise ValueError(f"clip applies to evidence='logits' only; votes are already {{0, 1}} (got clip={clip!r})")
        if evidence == "logits":
            low, high = (-1.0, 1.0) if clip is None else clip
            if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or not low < high:
                raise ValueError(f"clip must be a finite (low, high) with low < high, got {clip!r}")
            self.clip = (float(low), float(high))
        else:
            self.clip = None
        kk = _check_k(k)
        self.evidence_kind = evidence
        self.k = k
        self.exact_margin = bool(exact_margin)
        self.mask_patch_size = None if mask_patch_size is None else parse_patch_size(mask_patch_size)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1 (images per forward pass), got {batch_size!r}")
        self.batch_size = batch_size
        self.name = f"double-masking-{evidence}"
        if kk is not None:
            self.name += f"-k{kk[0]}" if kk[0] == kk[1] else f"-k{kk[0]}x{kk[1]}"

    def evidence(self, model, images: torch.Tensor) -> torch.Tensor:
        """The evidence map of ``images`` (float [N, 3, H, W] in [0, 1]): votes as float32 {0, 1} [N, C, h, w],
        or the clipped local logits. Raises ``TypeError`` for a model without ``local_logits`` and ``geometry``,
        ``RuntimeError`` for a model in training mode, ``ValueError`` for malformed images."""
        model = as_classifier(model)
        if not hasattr(model, "local_logits") or not hasattr(model, "geometry"):
            raise TypeError("double masking on the local map needs a bagcert model with .local_logits() and .geometry")
        check_images_for_peer(images)
        bs = self.batch_size or images.shape[0]
        # evaluated as bagcert.certify evaluates the model (inference copy, fixed chunks): each image's evidence is
        # the same bits whatever the batch it comes in
        z = torch.cat([evaluate_local_logits(model, images[i : i + bs]) for i in range(0, images.shape[0], bs)])
        if self.evidence_kind == "votes":
            return (z > 0).to(z.dtype)
        return z.clamp(min=self.clip[0], max=self.clip[1])

    def mask_set(self, geometry: Geometry, image_size, patch_size) -> FeatureMaskSet:
        """The mask set used against ``patch_size`` (built for ``mask_patch_size`` when that is set)."""
        ms = feature_mask_set(geometry, image_size, self.mask_patch_size or patch_size, self.k)
        if self.mask_patch_size is not None:
            check_coverage(ms, geometry, image_size, patch_size)
        return ms

    def certify_evidence(self, evidence: torch.Tensor, labels, geometry: Geometry, image_size, patch_size) -> CertResult:
        """:func:`double_masking_certify_evidence` with this certifier's settings, for an ``evidence`` map made by
        :meth:`evidence` (one forward pass serves every patch size)."""
        bound = None if self.clip is None else max(abs(self.clip[0]), abs(self.clip[1]))
        return double_masking_certify_evidence(evidence, labels, geometry, image_size, patch_size, k=self.k,
                                               mask_patch_size=self.mask_patch_size, clip_bound=bound, exact_margin=self.exact_margin, name=self.name)

    @torch.no_grad()
    def certify(self, model, images: torch.Tensor, labels, patch_size) -> CertResult:
        """Prediction and certificate of ``images`` float [N, 3, H, W] in [0, 1] against a patch of ``patch_size``."""
        ev = self.evidence(model, images)
        size = tuple(images.shape[-2:])
        geometry = verify_geometry(model, size).for_map(size, ev.shape[-2:])  # the declared geometry, checked
        return self.certify_evidence(ev, labels, geometry, size, patch_size)

    @torch.no_grad()
    def predict(self, model, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        """The double-masking prediction, int64 [N]; the mask set depends on ``patch_size``."""
        if patch_size is None:
            raise ValueError("double masking's mask set depends on the patch size: pass patch_size")
        ev = self.evidence(model, images)
        size = tuple(images.shape[-2:])
        geometry = verify_geometry(model, size).for_map(size, ev.shape[-2:])
        return double_masking_predict(ev, self.mask_set(geometry, size, patch_size))

    def forward_passes_per_image(self, image_size=None, patch_size=None) -> int:
        return 1
