r"""PatchCleanser double masking (Xiang, Mahloujifar, Mittal, USENIX Security 2022), re-derived.

Mask set (per axis, then the product). Image side n, patch side p, k masks per axis:

    s = ceil((n - p + 1) / k)          mask stride
    m = p + s - 1                      mask side
    starts = { min(j * s, n - m) : j = 0 .. k-1 }   (the last masks are moved back inside the image)

Coverage, per axis. A patch on pixels ``[a, a + p - 1]`` lies inside the mask ``[t, t + m - 1]`` iff
``t <= a <= t + m - p = t + s - 1``. The unclamped starts ``t = j s`` therefore cover
``a ∈ [j s, j s + s - 1]``, together ``[0, k s - 1] ⊇ [0, n - p]`` because ``k s >= n - p + 1``.
A clamped start ``t' = n - m`` covers ``a ∈ [n - m, n - p]``; it replaces a start ``j s > n - m``
whose patch starts ``[j s, n - p]`` lie inside that range, so nothing is lost. In 2-D the mask set is
every (row mask) x (column mask) rectangle, ``k_rows * k_cols`` masks (k^2 = 36 for k = 6), and a
patch is covered by the product of a row mask covering its rows and a column mask covering its
columns. (If ``m >= n`` one mask is the whole axis.) The test suite checks coverage of every patch
position by brute force.

Masking: masked pixels are set to a constant ``fill`` (default 0.5, grey in [0, 1] pixel space);
any constant works, it only must not depend on the image, so that masking the patch region makes
the patched and the clean image identical.

Double-masking inference (the defended prediction), for a possibly patched image x:
  1. first round: ``ŷ_r = F(x ⊙ r)`` for every mask r; ``y_maj`` = the most frequent ŷ_r (ties to the
     lower class index). If every ŷ_r equals y_maj, return it (agreed prediction).
  2. otherwise, for each disagreeing mask r (ŷ_r != y_maj), in mask order: second round
     ``ŷ_{r,r'} = F(x ⊙ r ⊙ r')`` for every r'. If all equal ŷ_r, return ŷ_r (the first such r).
  3. otherwise return y_maj.

Certificate (two-mask correctness): certified iff ``F(x ⊙ r ⊙ r') = y`` for every pair r, r' in the
mask set, identical pairs (one-mask predictions) included; y is then also the clean double-masking
prediction. Soundness: let r* be a mask covering the patch, so ``x' ⊙ r* = x ⊙ r*``. (i) ŷ'_{r*} = y.
(ii) A disagreer r with ŷ'_r != y is never returned: its second round contains
``F(x' ⊙ r ⊙ r*) = F(x ⊙ r ⊙ r*) = y != ŷ'_r``. (iii) If y'_maj != y, then r* is a disagreer whose
whole second round is ``F(x ⊙ r* ⊙ r') = y``, so step 2 returns y (at r* or at an earlier disagreer,
which by (ii) must predict y). (iv) If y'_maj = y, step 1 or 3 returns y and step 2 can return only
y by (ii). So the output is y for every patch inside some mask.

Cost: certification evaluates every unordered pair once: ``M (M + 1) / 2`` passes for M = k^2 masks
(666 for k = 6). ``margin`` = 1 - (number of pairs whose prediction differs from y) (> 0 iff
certified); ``worst_position`` is zeros (the certificate is not tied to a patch position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..certification import CertResult
from ..geometry import parse_patch_size
from .base import PeerCertifier, as_classifier, batched_predictions, check_images_for_peer, check_labels, make_result

__all__ = ["MaskSet", "PatchCleanser", "mask_axis", "double_masking_from_pairs"]


def mask_axis(n: int, p: int, k: int) -> tuple[int, int, tuple[int, ...]]:
    """Mask side m, stride s and the sorted distinct starts along one axis (see the module doc)."""
    if not 1 <= p <= n:
        raise ValueError(f"patch side {p} must lie in [1, {n}]")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = math.ceil((n - p + 1) / k)
    m = p + s - 1
    last = max(0, n - m)
    starts = tuple(sorted({min(j * s, last) for j in range(k)}))
    return min(m, n), s, starts


@dataclass(frozen=True)
class MaskSet:
    """A PatchCleanser mask set: ``masks()[i * len(col_starts) + j]`` masks rows
    ``row_starts[i] .. + mask_size[0] - 1`` x columns ``col_starts[j] .. + mask_size[1] - 1``."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    k: tuple[int, int]
    mask_size: tuple[int, int]
    stride: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @classmethod
    def for_patch(cls, image_size, patch_size, k=6) -> "MaskSet":
        H, W = int(image_size[0]), int(image_size[1])
        ph, pw = parse_patch_size(patch_size)
        kh, kw = (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))
        mh, sh, rows = mask_axis(H, ph, kh)
        mw, sw, cols = mask_axis(W, pw, kw)
        return cls((H, W), (ph, pw), (kh, kw), (mh, mw), (sh, sw), rows, cols)

    @property
    def num_masks(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def masks(self, device=None) -> torch.Tensor:
        """bool [M, H, W], True = masked."""
        H, W = self.image_size
        mh, mw = self.mask_size
        r = torch.arange(H, device=device)
        c = torch.arange(W, device=device)
        rs = torch.tensor(self.row_starts, device=device)
        cs = torch.tensor(self.col_starts, device=device)
        row_in = (r[None, :] >= rs[:, None]) & (r[None, :] < rs[:, None] + mh)  # [kr, H]
        col_in = (c[None, :] >= cs[:, None]) & (c[None, :] < cs[:, None] + mw)  # [kc, W]
        return (row_in[:, None, :, None] & col_in[None, :, None, :]).reshape(-1, H, W)


def double_masking_from_pairs(pair_preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Double-masking prediction from the full table ``pair_preds[n, r, r'] = F(x ⊙ r ⊙ r')`` [N, M, M]."""
    N, M, _ = pair_preds.shape
    one = pair_preds.diagonal(dim1=1, dim2=2)  # [N, M] first round: F(x ⊙ r)
    counts = torch.zeros(N, num_classes, dtype=torch.long, device=one.device).scatter_add_(1, one, torch.ones_like(one))
    maj = counts.argmax(dim=1)  # majority, ties to the lower class index
    disagree = one != maj[:, None]
    unanimous = (pair_preds == one[:, :, None]).all(dim=2)  # second round of r agrees with ŷ_r
    cand = disagree & unanimous
    first = cand.long().argmax(dim=1)  # first candidate in mask order
    trusted = one.gather(1, first[:, None]).squeeze(1)
    return torch.where(cand.any(dim=1), trusted, maj)


class PatchCleanser(PeerCertifier):
    """PatchCleanser double masking around any classifier ``fn(x) -> logits`` on [0, 1] images.

    Args:
        k: masks per axis (int or (rows, cols)); k^2 masks, ``k^2 (k^2 + 1) / 2`` passes to certify.
        fill: value written into masked pixels.
        batch_size: masked images per classifier call.
    """

    def __init__(self, k=6, fill: float = 0.5, batch_size: int = 512):
        kk = (k, k) if isinstance(k, int) else tuple(int(v) for v in k)
        if min(kk) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must lie in [0, 1], got {fill}")
        self.k = kk
        self.fill = float(fill)
        self.batch_size = int(batch_size)
        self.name = f"patchcleanser-k{kk[0]}" if kk[0] == kk[1] else f"patchcleanser-k{kk[0]}x{kk[1]}"
        self.last_forward_passes = 0

    def mask_set(self, image_size, patch_size) -> MaskSet:
        return MaskSet.for_patch(image_size, patch_size, self.k)

    def forward_passes_per_image(self, image_size, patch_size) -> int:
        M = self.mask_set(image_size, patch_size).num_masks
        return M * (M + 1) // 2

    @torch.no_grad()
    def two_mask_predictions(self, model_or_fn, images: torch.Tensor, mask_set: MaskSet):
        """``(pair_preds [N, M, M], num_classes)``: F(x ⊙ r ⊙ r') for every pair, each unordered pair run once."""
        fn = as_classifier(model_or_fn)
        check_images_for_peer(images)
        masks = mask_set.masks(images.device)
        M = masks.shape[0]
        iu = torch.triu_indices(M, M, device=images.device)  # pairs r <= r' (r == r': one mask)
        P = iu.shape[1]

        def build(idx):
            pair = idx % P
            union = masks[iu[0, pair]] | masks[iu[1, pair]]
            return images[idx // P].masked_fill(union[:, None], self.fill)

        flat, C = batched_predictions(fn, images.shape[0] * P, build, self.batch_size, images.device)
        flat = flat.view(-1, P)
        table = torch.empty(images.shape[0], M, M, dtype=torch.long, device=images.device)
        table[:, iu[0], iu[1]] = flat
        table[:, iu[1], iu[0]] = flat  # masking commutes: x ⊙ r ⊙ r' = x ⊙ r' ⊙ r
        self.last_forward_passes = images.shape[0] * P
        return table, C

    @torch.no_grad()
    def certify(self, model_or_fn, images: torch.Tensor, labels, patch_size) -> CertResult:
        check_images_for_peer(images)
        N = images.shape[0]
        labels = check_labels(labels, N, images.device)
        ms = self.mask_set(images.shape[-2:], patch_size)
        table, C = self.two_mask_predictions(model_or_fn, images, ms)
        if labels is not None and N and labels.max() >= C:
            raise ValueError(f"labels must lie in [0, {C})")
        pred = double_masking_from_pairs(table, C)
        M = table.shape[1]
        iu = torch.triu_indices(M, M, device=images.device)
        wrong = (table[:, iu[0], iu[1]] != pred[:, None]).sum(dim=1)  # unordered pairs that disagree
        certified = wrong == 0
        return make_result(pred, labels, certified, 1 - wrong, ms.patch_size, self.name)

    @torch.no_grad()
    def predict(self, model_or_fn, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        """Double-masking inference, computing second rounds only where the first round disagrees.

        The number of classifier calls spent is left in ``self.last_forward_passes``.
        """
        if patch_size is None:
            raise ValueError("PatchCleanser's mask set depends on the patch size: pass patch_size")
        fn = as_classifier(model_or_fn)
        check_images_for_peer(images)
        ms = self.mask_set(images.shape[-2:], patch_size)
        masks = ms.masks(images.device)
        N, M = images.shape[0], masks.shape[0]
        one, C = batched_predictions(
            fn, N * M, lambda idx: images[idx // M].masked_fill(masks[idx % M][:, None], self.fill), self.batch_size, images.device
        )
        one = one.view(N, M)
        passes = N * M
        counts = torch.zeros(N, C, dtype=torch.long, device=images.device).scatter_add_(1, one, torch.ones_like(one))
        out = counts.argmax(dim=1)  # y_maj, ties to the lower class index
        for n in torch.nonzero((one != out[:, None]).any(dim=1)).flatten().tolist():
            for r in torch.nonzero(one[n] != out[n]).flatten().tolist():  # disagreers, in mask order
                union = masks[r][None] | masks
                second, _ = batched_predictions(
                    fn,
                    M,
                    lambda idx: images[n].expand(idx.numel(), -1, -1, -1).masked_fill(union[idx][:, None], self.fill),
                    self.batch_size,
                    images.device,
                )
                passes += M
                if bool((second == one[n, r]).all()):
                    out[n] = one[n, r]
                    break
        self.last_forward_passes = passes
        return out
