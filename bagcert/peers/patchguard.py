r"""PatchGuard robust masking (Xiang, Bhagoji, Sehwag, Mittal, USENIX Security 2021), re-derived.

Evidence. ``u[c, l] = clip(z[c, l], low, high) >= 0``: the model's local logit of class c at
location l, clipped to be non-negative (``low = 0``; ``high = None`` means no upper clip, i.e. ReLU).
Or the BagCert votes themselves, ``u[c, l] = 1 if z[c, l] > 0 else 0`` (``evidence="votes"`` of
:class:`PatchGuardMasking`): the certificate below holds for any evidence in ``[0, inf)``, so it holds
for binary evidence unchanged (an attacker who can write any value is at least as strong as one who
can write only 0 or 1).

Windows. ``𝒲`` is the set of every ``wh x ww`` window fully inside the ``h x w`` evidence map. The
window size is the largest affected set of a patch of the requested size, read from the model's
geometry (``Geometry.affected_ranges``): ``wh`` = the largest number of affected rows over all patch
positions, ``ww`` the same for columns (clipped to the map). No receptive field or stride is
hard-coded. Every affected set R(p) is then contained in at least one window of 𝒲.

Robust masking (the defended prediction). For each class c, with ``T_c = sum_l u[c, l]`` and
``S_c(w)`` the evidence of c inside window w:

    detected_c  = max_w S_c(w) > tau * T_c                          (tau = detection threshold, default 0)
    m_c         = T_c - max_w S_c(w)   if detected_c   else   T_c
    prediction  = argmax_c m_c          (ties to the lower class index)

Ties are decided by the rule, not by rounding: integer evidence (votes) is summed in int64, so equal masked vote
counts are equal; float evidence (clipped logits) is summed in float64 and masked evidence within
``TIE_TOLERANCE * max(1, largest class total)`` (1e-9 relative) of the maximum counts as tied
(:func:`masked_prediction`). A certificate needs a margin above ``1e-9 * max(1, largest class total)`` for either
kind (the bounds are computed in float64 and divided by ``1 - tau``).

With tau = 0 the highest-evidence window is always removed.

Certificate. A patch at pixel position p changes only the locations in R(p), and may set their
evidence to any non-negative value (any value in [0, high] with an upper clip). Write ``u'`` for the
evidence after the attack, ``W_c(A)`` for the clean evidence of c summed over a set A, y for the
clean prediction.

Upper bound for every other class c != y (the adversary can *add* evidence for c inside R(p)).
Take any window ``w0 ⊇ R(p)``. Every location outside w0 is outside R(p), so it is unchanged.
  * If c's window is detected: ``m'_c = T'_c - max_w S'_c(w) <= T'_c - S'_c(w0) = T_c - S_c(w0)``,
    because w0 is one of the candidate windows.
  * If not: ``S'_c(w0) <= max_w S'_c(w) <= tau T'_c``, so ``T'_c - S'_c(w0) >= (1 - tau) T'_c`` and
    ``m'_c = T'_c <= (T_c - S_c(w0)) / (1 - tau)``.
  Both cases, minimised over the choice of w0:

      UB_c(p) = (T_c - max_{w0 in 𝒲, w0 ⊇ R(p)} S_c(w0)) / (1 - tau).

  This needs no upper clip: however much evidence the patch writes, the window containing it is
  masked (or, undetected, it is at most a tau share). In the interior R(p) is itself a window, and
  with tau = 0 and no upper clip the bound is attained (write a large value on R(p)).

Lower bound for the prediction y (the adversary *removes* evidence for y inside R(p)). Let v be y's
evidence with R(p) set to zero. Evidence is non-negative, so dropping terms only lowers a sum:
  * detected, masked window w*: ``m'_y = sum_{l not in w*} u'_y(l) >= sum_{l not in w* ∪ R(p)} u_y(l)
    = T_y - W_y(R(p)) - S_v(w*) >= T_y - W_y(R(p)) - max_w S_v(w)``;
  * not detected: ``m'_y = T'_y >= T_y - W_y(R(p))``, which is larger still. So

      LB_y(p) = T_y - W_y(R(p)) - max_{w in 𝒲} [ S_y(w) - W_y(w ∩ R(p)) ].

  The maximum runs over *all* windows of the map with R(p)'s evidence removed first: after the
  attack the removed window may move anywhere, so the clean masked window must not be reused. With
  tau = 0 the bound is attained (the adversary zeroes y's evidence on R(p)); the test suite checks
  this equality by brute force, so the bound is neither loose nor optimistic.

  With tau > 0 the bound is tightened as in PatchGuard's own analysis (Xiang et al. 2021): a masked window
  w* that does not overlap R(p) holds only unchanged evidence, ``S'_y(w*) = S_v(w*)``, and being detected
  means ``S_v(w*) > tau T'_y >= tau T_v`` (``T_v = T_y - W_y(R(p))``; the patch cannot lower evidence outside
  R(p)). So when the zeroed map v is not detected (``max_w S_v(w) <= tau T_v``), only a window overlapping
  R(p) can be masked, and

      LB_y(p) = T_v - max_{w in 𝒲, w ∩ R(p) ≠ ∅} S_v(w)       (0 for the maximum over no window),

  else the bound above. With tau = 0 both agree (v not detected means v = 0). The brute-force tests
  check soundness for tau > 0 and that the tighter bound certifies more than the plain one.

Decision. Certified iff ``LB_y(p) > UB_c(p)`` for every pixel position p of the patch fully inside
the image and every class c != y. The inequality is strict: a tie after the attack is never
certified, whichever way the tie rule would break it. ``margin`` = min over p and c of
``LB_y(p) - UB_c(p)`` (float evidence units); ``worst_position`` = the p attaining it.

Cost: one forward pass; window sums come from integral images (2-D cumulative sums).
"""

from __future__ import annotations

import torch

from ..inference import evaluate_local_logits

from ..certification import CertResult, window_table
from ..geometry import Geometry, parse_patch_size
from ..geometry_inference import verify_geometry
from .base import PeerCertifier, as_classifier, check_images_for_peer, check_labels, make_result

__all__ = [
    "EVIDENCE_KINDS",
    "PatchGuardMasking",
    "evidence_window_size",
    "robust_masking",
    "patchguard_certify_evidence",
    "window_sums",
    "masked_prediction",
    "tie_tolerance",
    "TIE_TOLERANCE",
]


def evidence_window_size(geometry: Geometry, image_size, patch_size) -> tuple[int, int]:
    """Size (rows, cols) of the masking window: the largest affected set of a patch, from the geometry."""
    H, W = int(image_size[0]), int(image_size[1])
    rows, cols = geometry.affected_ranges((H, W), parse_patch_size(patch_size))
    h, w = geometry.grid_size(H, W)
    wh = int((rows[:, 1] - rows[:, 0] + 1).max())
    ww = int((cols[:, 1] - cols[:, 0] + 1).max())
    return max(1, min(wh, h)), max(1, min(ww, w))


def _integral(x: torch.Tensor) -> torch.Tensor:
    """Integral image with a zero row/column in front: I[..., i, j] = sum of x[..., :i, :j]."""
    I = torch.zeros(*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    I[..., 1:, 1:] = x.cumsum(-2).cumsum(-1)
    return I


def window_sums(evidence: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Sum of ``evidence`` [..., h, w] over every ``window`` fully inside the map: [..., h-wh+1, w-ww+1]."""
    wh, ww = window
    I = _integral(evidence)
    return I[..., wh:, ww:] - I[..., :-wh, ww:] - I[..., wh:, :-ww] + I[..., :-wh, :-ww]


#: Relative tolerance of the float path: masked evidence within ``TIE_TOLERANCE * max(1, largest class total)`` of
#: the maximum counts as tied with it (the prediction then takes the lower class index), and a certificate needs a
#: margin above the same amount. Float window sums from integral images carry rounding residues (~1e-16 relative)
#: that would otherwise decide exact ties.
TIE_TOLERANCE = 1e-9


def _integer_valued(evidence: torch.Tensor) -> bool:
    """Whether every entry is an integer and every class total fits float64's exact integers (BagCert votes)."""
    if not evidence.dtype.is_floating_point:
        return True
    if evidence.numel() == 0:
        return True
    return bool((evidence == evidence.round()).all()) and float(evidence.abs().sum(dim=(-2, -1)).max()) < 2.0 ** 52


def robust_masking(evidence: torch.Tensor, window: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """Masked class evidence m_c [N, C] (see the module doc); the prediction is :func:`masked_prediction` of it.

    Integer-valued evidence (BagCert's votes) is summed in int64 and returned as int64: equal masked vote counts are
    equal exactly. Other evidence is summed in float64 (its ties are decided with :data:`TIE_TOLERANCE`)."""
    x = evidence.round().long() if _integer_valued(evidence) else evidence.double()
    ws = window_sums(x, window).flatten(-2)
    best = ws.max(dim=-1).values
    total = x.sum(dim=(-2, -1))
    # DetectWindow: the highest window is masked iff it holds more than a tau share of the evidence
    detected = best > threshold * total
    return torch.where(detected, total - best, total)


def tie_tolerance(evidence: torch.Tensor) -> torch.Tensor:
    """Per-sample tolerance [N] of the float path: ``TIE_TOLERANCE * max(1, largest class total)``; 0 for
    integer-valued evidence (exact sums)."""
    if _integer_valued(evidence):
        return torch.zeros(evidence.shape[0], dtype=torch.float64, device=evidence.device)
    return TIE_TOLERANCE * torch.clamp(evidence.double().sum(dim=(-2, -1)).abs().amax(dim=1), min=1.0)


def masked_prediction(masked: torch.Tensor, tol=None) -> torch.Tensor:
    """The robust-masking prediction int64 [N] from masked evidence [N, C]: the lowest class index among the classes
    whose masked evidence is within ``tol`` [N] (default 0: exact) of the maximum (the documented lower-index rule)."""
    top = masked.amax(dim=1, keepdim=True)
    near = masked >= (top if tol is None else top - tol.to(masked.dtype).view(-1, 1))
    return near.to(torch.uint8).argmax(dim=1)  # the first True: argmax returns the first of equal maxima


def _check_clip(clip):
    low, high = clip
    if low is None or low < 0:
        raise ValueError(f"PatchGuard evidence must be clipped below at a value >= 0 (got low={low})")
    if high is not None and high <= low:
        raise ValueError(f"clip upper bound {high} must exceed the lower bound {low}")
    return float(low), None if high is None else float(high)


def patchguard_certify_evidence(
    evidence: torch.Tensor,
    labels,
    geometry: Geometry,
    image_size,
    patch_size,
    threshold: float = 0.0,
    name: str = "patchguard",
) -> CertResult:
    """Robust-masking prediction and certificate from a non-negative evidence map.

    Args:
        evidence: float [N, C, h, w], every entry in ``[0, inf)`` (clipped local logits, or votes in
            {0, 1}); ``(h, w)`` must be ``geometry.grid_size(*image_size)``.
        labels: int64 [N] in [0, C), or None.
        geometry: the model's receptive-field geometry; image_size: ``(H, W)`` pixels; patch_size: int
            or ``(h, w)`` pixels, at most the image.
        threshold: detection threshold tau in [0, 1); name: written into ``CertResult.aggregation``.

    Returns a ``CertResult``: prediction int64 [N] (argmax of the masked evidence, ties to the lower
    class), certified bool [N], margin float64 [N] (evidence units; > 0 iff certified), worst_position
    int64 [N, 2]. The certificate is proven for any evidence in ``[0, inf)`` (module docstring).

    Raises:
        ValueError: evidence that is not 4-D, holds NaN / Inf or negative values, has fewer than 2
            classes or a map size the geometry does not give; a threshold outside [0, 1); a patch
            larger than the image; labels of the wrong shape or outside [0, C).
    """
    if not isinstance(evidence, torch.Tensor) or evidence.dim() != 4:
        raise ValueError("evidence must be a tensor [N, C, h, w]")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"detection threshold must lie in [0, 1), got {threshold}")
    if not torch.isfinite(evidence).all():
        raise ValueError("evidence contains NaN or Inf")
    if (evidence < 0).any():
        raise ValueError("PatchGuard evidence must be non-negative (clip the local logits first)")
    N, C, h, w = evidence.shape
    if C < 2:
        raise ValueError(f"need at least 2 classes to certify, got {C}")
    H, W = int(image_size[0]), int(image_size[1])
    if not geometry.knows_grid(H, W):  # a geometry without a layer chain takes its grid from the map
        geometry = geometry.at_grid((H, W), (h, w))
    if geometry.grid_size(H, W) != (h, w):
        raise ValueError(f"evidence map is {h}x{w} but the geometry gives {geometry.grid_size(H, W)} for {H}x{W} images")
    ph, pw = parse_patch_size(patch_size)
    if ph > H or pw > W:
        raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image")
    labels = check_labels(labels, N, evidence.device)
    if labels is not None and N and labels.max() >= C:
        raise ValueError(f"labels must lie in [0, {C})")

    u = evidence.double()
    wh, ww = evidence_window_size(geometry, (H, W), (ph, pw))
    nh, nw = h - wh + 1, w - ww + 1
    ws = window_sums(u, (wh, ww))  # [N, C, nh, nw]   S_c(w) for every window
    total = u.sum(dim=(2, 3))  # [N, C]           T_c
    tol = tie_tolerance(evidence)  # 0 for votes (integer sums), else TIE_TOLERANCE relative
    pred = masked_prediction(robust_masking(evidence, (wh, ww), threshold), tol)  # ties to the lower class index

    table = window_table(geometry, (H, W), (ph, pw))  # distinct affected ranges, on the host
    ur, uc = table.rows, table.cols
    empty_r = ur[:, 1] < ur[:, 0]
    empty_c = uc[:, 1] < uc[:, 0]

    # --- UB_c(p): max evidence of a window w0 ⊇ R(p), per unique row range x unique col range ---
    # a window with top row i covers rows [r0, r1] iff i <= r0 and i + wh - 1 >= r1
    def cover_max(x, ranges, n_pos, dim):
        out = []
        for r0, r1 in ranges.tolist():
            lo, hi = max(0, r1 - wh + 1 if dim == 2 else r1 - ww + 1), min(r0, n_pos - 1)
            out.append(x.narrow(dim, lo, hi - lo + 1).amax(dim=dim, keepdim=True))
        return torch.cat(out, dim=dim)

    ur_ne, uc_ne = ur.clone(), uc.clone()
    # empty ranges: any window covers the empty set; map them to the full range of window tops
    ur_ne[empty_r] = torch.tensor([nh - 1, 0])
    uc_ne[empty_c] = torch.tensor([nw - 1, 0])
    cov = cover_max(cover_max(ws, ur_ne, nh, 2), uc_ne, nw, 3)  # [N, C, Ur, Uc]
    any_empty = empty_r[:, None] | empty_c[None, :]  # R(p) is empty if either axis range is empty
    cov = torch.where(any_empty.to(cov.device), ws.flatten(2).amax(2)[:, :, None, None], cov)
    ub = (total[:, :, None, None] - cov) / (1.0 - threshold)  # [N, C, Ur, Uc]
    ub.scatter_(1, pred.view(N, 1, 1, 1).expand(N, 1, ub.shape[2], ub.shape[3]), float("-inf"))
    ub_other = ub.amax(dim=1)  # [N, Ur, Uc]  max over c != y

    # --- LB_y(p) = T_y - W_y(R) - max_w [S_y(w) - W_y(w ∩ R)] ---
    Iy = _integral(u.gather(1, pred.view(N, 1, 1, 1).expand(N, 1, h, w)).squeeze(1))  # [N, h+1, w+1]
    ws_y = ws.gather(1, pred.view(N, 1, 1, 1).expand(N, 1, nh, nw)).squeeze(1)  # [N, nh, nw]
    total_y = total.gather(1, pred.view(N, 1)).squeeze(1)
    ti = torch.arange(nh)
    tj = torch.arange(nw)
    c0 = uc[:, 0].clamp(max=w)
    c1 = uc[:, 1]
    # intersection of window columns [j, j+ww-1] with [c0, c1], as integral-image indices [b0, b1)
    b0 = torch.maximum(tj[None, :], c0[:, None])  # [Uc, nw]
    b1 = torch.maximum(torch.minimum(tj[None, :] + ww - 1, c1[:, None]) + 1, b0)
    # windows (column starts) that overlap each unique column range; an empty range overlaps nothing
    ov_c = (tj[None, :] <= c1[:, None]) & (tj[None, :] + ww - 1 >= uc[:, 0][:, None]) & ~empty_c[:, None]  # [Uc, nw]
    tol_v = 1e-9 * torch.clamp(total.abs().amax(dim=1), min=1.0)[:, None]  # [N, 1]
    lb = torch.empty(N, ur.shape[0], uc.shape[0], dtype=torch.float64, device=u.device)
    for k, (r0, r1) in enumerate(ur.tolist()):
        a0 = torch.clamp(torch.maximum(ti, torch.tensor(r0)), max=h)  # [nh]
        a1 = torch.maximum(torch.minimum(ti + wh - 1, torch.tensor(r1)) + 1, a0)
        strip = Iy[:, a1, :] - Iy[:, a0, :]  # [N, nh, w+1]: column-cumulative sums of the row strip
        inter = strip[:, :, b1] - strip[:, :, b0]  # [N, nh, Uc, nw]  W_y(w ∩ R)
        s_v = ws_y[:, :, None, :] - inter  # [N, nh, Uc, nw]  S_v(w): y's evidence with R zeroed, per window
        q_all = s_v.amax(dim=(1, 3))  # [N, Uc]  max over every window
        ov_r = (ti <= r1) & (ti + wh - 1 >= r0) & (r1 >= r0)  # [nh] window rows that overlap R's rows
        ov = (ov_r[:, None, None] & ov_c[None, :, :]).to(s_v.device)  # [nh, Uc, nw]
        q_ov = torch.where(ov, s_v, torch.zeros((), dtype=s_v.dtype, device=s_v.device)).amax(dim=(1, 3))  # [N, Uc]
        r_lo, r_hi = min(r0, h), max(r1 + 1, min(r0, h))
        # W_y(R) over rows [r0, r1] and every unique column range (zero for empty ranges)
        cs = Iy[:, r_hi, :] - Iy[:, r_lo, :]  # [N, w+1]
        c_hi = torch.maximum(c1 + 1, c0)
        w_r = cs[:, c_hi] - cs[:, c0]  # [N, Uc]
        t_v = total_y[:, None] - w_r  # [N, Uc]  T_v
        # a window outside R can be the masked one only if the zeroed map v is detected (module doc); near the
        # threshold count v as detected (the smaller bound)
        v_detected = q_all > threshold * t_v - tol_v
        lb[:, k, :] = t_v - torch.where(v_detected, q_all, q_ov)

    margins = lb - ub_other  # [N, Ur, Uc]
    flat = margins.reshape(N, -1)
    margin, arg = flat.min(dim=1)
    # float sums (and the division by 1 - tau): demand a margin clearly above the rounding noise of float64 sums
    certified = margin > 1e-9 * torch.clamp(total.abs().amax(dim=1), min=1.0)
    first_r, first_c = table.first_row.to(arg.device), table.first_col.to(arg.device)
    worst = torch.stack([first_r[arg // uc.shape[0]], first_c[arg % uc.shape[0]]], dim=1)
    return make_result(pred, labels, certified, margin, (ph, pw), name, worst)


EVIDENCE_KINDS = ("logits", "votes")


class PatchGuardMasking(PeerCertifier):
    """PatchGuard robust masking on a bagcert model's local logits or votes (one forward pass).

    Args:
        clip: ``(low, high)`` clipping of the local logits into evidence, ``low >= 0``; only with
            ``evidence="logits"``. ``None`` (default) means ``(0, None)``: ReLU, no upper clip (the
            certificate does not need one).
        threshold: detection threshold tau in [0, 1) (default 0: always mask the top window).
        batch_size: forward pass in chunks of this many images (default: all at once).
        evidence: ``"logits"`` (default): the clipped local logits, float32 [N, C, h, w] in
            ``[low, high]``; ``"votes"``: BagCert's votes ``(local_logits > 0)`` as float32 {0, 1}
            [N, C, h, w] (robust masking of the votes; ``clip`` must then be left at ``None``).

    ``name``: ``"patchguard"`` / ``"patchguard-votes"``, with ``-t<tau>`` appended for a threshold
    (``"patchguard-votes-t0.1"``). The certificate is the module's (:func:`patchguard_certify_evidence`),
    proven for any evidence in ``[0, inf)``, so it covers both kinds; margins are in evidence units
    (votes for ``"votes"``). See the module docstring for the rule and the derivation of both bounds.

    Raises:
        ValueError: an unknown ``evidence``, a ``clip`` together with ``evidence="votes"``, a clip
            with ``low < 0`` or ``high <= low``, or a threshold outside [0, 1).
    """

    def __init__(self, clip=None, threshold: float = 0.0, batch_size: int | None = None, evidence: str = "logits"):
        if evidence not in EVIDENCE_KINDS:
            raise ValueError(f"evidence must be one of {', '.join(EVIDENCE_KINDS)}, got {evidence!r}")
        if evidence == "votes" and clip is not None:
            raise ValueError(
                f"clip applies to evidence='logits' only; evidence='votes' is already {{0, 1}}, leave clip at its "
                f"default None (got clip={clip!r})"
            )
        self.evidence_kind = evidence
        self.clip = _check_clip((0.0, None) if clip is None else clip) if evidence == "logits" else None
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"detection threshold must lie in [0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.batch_size = batch_size
        base = "patchguard" if evidence == "logits" else "patchguard-votes"
        self.name = base if threshold == 0 else f"{base}-t{threshold:g}"

    def evidence(self, model, images: torch.Tensor) -> torch.Tensor:
        """The evidence map of ``images`` (float [N, 3, H, W] in [0, 1]): float32 [N, C, h, w], non-negative
        (clipped logits, or votes in {0, 1}). Raises ``TypeError`` for a model without ``local_logits`` and
        ``geometry``, ``RuntimeError`` for a model in training mode, ``ValueError`` for malformed images."""
        model = as_classifier(model)
        if not hasattr(model, "local_logits") or not hasattr(model, "geometry"):
            raise TypeError("PatchGuard needs a bagcert model with .local_logits() and .geometry")
        check_images_for_peer(images)
        bs = self.batch_size or images.shape[0]
        chunks = [evaluate_local_logits(model, images[i : i + bs]) for i in range(0, images.shape[0], bs)]  # as certify does
        z = torch.cat(chunks)
        if self.evidence_kind == "votes":
            return (z > 0).to(z.dtype)
        low, high = self.clip
        return z.clamp(min=low, max=high)

    def certify_evidence(self, evidence: torch.Tensor, labels, geometry: Geometry, image_size, patch_size) -> CertResult:
        """:func:`patchguard_certify_evidence` with this certifier's threshold and name, for an ``evidence``
        map [N, C, h, w] made by :meth:`evidence` (one forward pass serves every patch size)."""
        return patchguard_certify_evidence(evidence, labels, geometry, image_size, patch_size, self.threshold, self.name)

    @torch.no_grad()
    def certify(self, model, images: torch.Tensor, labels, patch_size) -> CertResult:
        """Robust-masking prediction and certificate of ``images`` float [N, 3, H, W] in [0, 1] against a patch
        of ``patch_size`` (int or (h, w) pixels); ``labels`` int64 [N] or None. Returns a ``CertResult`` with
        float64 margins in evidence units."""
        ev = self.evidence(model, images)
        geometry = verify_geometry(model, tuple(images.shape[-2:]))  # the declared geometry, checked (or inferred)
        return self.certify_evidence(ev, labels, geometry, tuple(images.shape[-2:]), patch_size)

    @torch.no_grad()
    def predict(self, model, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        """The robust-masking prediction, int64 [N] (ties to the lower class); the window depends on ``patch_size``."""
        if patch_size is None:
            raise ValueError("PatchGuard's masking window depends on the patch size: pass patch_size")
        ev = self.evidence(model, images)
        size = tuple(images.shape[-2:])
        geometry = verify_geometry(model, size).for_map(size, ev.shape[-2:])
        window = evidence_window_size(geometry, size, patch_size)
        return masked_prediction(robust_masking(ev, window, self.threshold), tie_tolerance(ev))

    def forward_passes_per_image(self, image_size=None, patch_size=None) -> int:
        return 1
