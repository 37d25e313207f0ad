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

Decision. Certified iff ``LB_y(p) > UB_c(p)`` for every pixel position p of the patch fully inside
the image and every class c != y. The inequality is strict: a tie after the attack is never
certified, whichever way the tie rule would break it. ``margin`` = min over p and c of
``LB_y(p) - UB_c(p)`` (float evidence units); ``worst_position`` = the p attaining it.

Cost: one forward pass; window sums come from integral images (2-D cumulative sums).
"""

from __future__ import annotations

import torch

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


def robust_masking(evidence: torch.Tensor, window: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """Masked class evidence m_c [N, C] (see the module doc); the prediction is its argmax."""
    ws = window_sums(evidence, window).flatten(-2)
    best = ws.max(dim=-1).values
    total = evidence.sum(dim=(-2, -1))
    # DetectWindow: the highest window is masked iff it holds more than a tau share of the evidence
    detected = best > threshold * total
    return torch.where(detected, total - best, total)


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
    masked = robust_masking(u, (wh, ww), threshold)
    pred = masked.argmax(dim=1)  # ties to the lower class index

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
    lb = torch.empty(N, ur.shape[0], uc.shape[0], dtype=torch.float64, device=u.device)
    for k, (r0, r1) in enumerate(ur.tolist()):
        a0 = torch.clamp(torch.maximum(ti, torch.tensor(r0)), max=h)  # [nh]
        a1 = torch.maximum(torch.minimum(ti + wh - 1, torch.tensor(r1)) + 1, a0)
        strip = Iy[:, a1, :] - Iy[:, a0, :]  # [N, nh, w+1]: column-cumulative sums of the row strip
        inter = strip[:, :, b1] - strip[:, :, b0]  # [N, nh, Uc, nw]  W_y(w ∩ R)
        q = (ws_y[:, :, None, :] - inter).amax(dim=(1, 3))  # [N, Uc]  max_w S_v(w)
        r_lo, r_hi = min(r0, h), max(r1 + 1, min(r0, h))
        # W_y(R) over rows [r0, r1] and every unique column range (zero for empty ranges)
        cs = Iy[:, r_hi, :] - Iy[:, r_lo, :]  # [N, w+1]
        c_hi = torch.maximum(c1 + 1, c0)
        w_r = cs[:, c_hi] - cs[:, c0]  # [N, Uc]
        lb[:, k, :] = total_y[:, None] - w_r - q

    margins = lb - ub_other  # [N, Ur, Uc]
    flat = margins.reshape(N, -1)
    margin, arg = flat.min(dim=1)
    # float sums: demand a margin clearly above the rounding noise of float64 sums
    tol = 1e-9 * torch.clamp(total.abs().amax(dim=1), min=1.0)
    certified = margin > tol
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
        chunks = [model.local_logits(images[i : i + bs]) for i in range(0, images.shape[0], bs)]
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
        ev = self.evidence(model, images).double()
        size = tuple(images.shape[-2:])
        geometry = verify_geometry(model, size).for_map(size, ev.shape[-2:])
        window = evidence_window_size(geometry, size, patch_size)
        return robust_masking(ev, window, self.threshold).argmax(dim=1)

    def forward_passes_per_image(self, image_size=None, patch_size=None) -> int:
        return 1
