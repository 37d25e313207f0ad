r"""De-randomized smoothing (Levine & Feizi, NeurIPS 2020), column and block ablation.

Ablation. For an H x W image and band size b, column ablation ``i`` (i = 0 .. W-1) keeps the b
columns ``i, i+1, ..., i+b-1`` (mod W: bands wrap around the right edge) and ablates every other
pixel. Block ablation (i, j) keeps the b x b block of rows ``i .. i+b-1`` (mod H) and columns
``j .. j+b-1`` (mod W); there are H * W of them. Every ablation is classified by the base
classifier (argmax of its logits, ties to the lower class index); ``n_c`` counts the ablations
that vote for class c.

Encoding of ablated pixels (:class:`AblatedInput`). The base classifier must be able to tell an
ablated pixel from a black one. Default ``"mask"``: 6 channels ``(x * keep, keep)`` (the kept
image and the keep mask repeated over the 3 colour channels). ``"levine_feizi"``: the paper's
channel doubling ``(x * keep, (1 - x) * keep)`` (a retained pixel x becomes (x, 1 - x), an ablated
one (0, 0)). The two carry the same information (``(1 - x) keep = keep - x keep``: an invertible
linear map of the channels), so a first convolution can learn either. ``"fill"`` keeps 3 channels
and writes a constant into ablated pixels, for plain 3-channel classifiers (not the paper's
encoding: an ablated pixel is then indistinguishable from a pixel of that colour, which costs
accuracy but not soundness).

Prediction. ``y = argmax_c n_c`` with ties going to the lower class index.

Certificate. A patch of ph x pw pixels at any position meets exactly
``Δ = min(W, pw + b - 1)`` column bands (block: ``min(H, ph + b - 1) * min(W, pw + b - 1)``):
band i meets the patch columns ``[a, a + pw - 1]`` iff ``i ∈ {a - b + 1, ..., a + pw - 1} mod W``.
Only those Δ ablations can change their vote, so after any patch ``n'_y >= n_y - Δ`` and
``n'_c <= n_c + Δ``. With the same tie rule as the prediction (ties to the lower index), y survives
against c iff ``n'_y > n'_c`` for ``c < y`` and ``n'_y >= n'_c`` for ``c > y``. Hence

    certified  iff  for every c != y:   n_y - n_c >= 2Δ + [c < y]
    (equivalently n_y >= max_{c != y} (n_c + 2Δ + [c < y])),

i.e. the top count beats the runner-up chosen *with the prediction's tie rule* by more than 2Δ,
where "more than" means ">= 2Δ" against a higher class index (y wins the tie) and "> 2Δ" against a
lower one. The certificate is computed relative to the actual prediction y, never relative to a
separately sorted "top class", so prediction and certificate cannot break a tie differently.
The bound is tight for count information: if the Δ ablations under some patch all vote y, moving
them to c reaches the equality case. ``margin`` = ``min_{c != y} (n_y - n_c - 2Δ + [c > y])``
(integer, > 0 iff certified).

Cost: W base-classifier passes per image for column ablation (H * W for blocks), batched.
"""

from __future__ import annotations

import torch

from ..certification import CertResult
from ..geometry import parse_patch_size
from ..models import BagModel
from .base import PeerCertifier, as_classifier, batched_predictions, check_images_for_peer, check_labels, make_result

__all__ = ["AblatedInput", "DerandomizedSmoothing", "ablation_keep_masks", "affected_ablations", "certify_counts"]

ENCODINGS = ("mask", "levine_feizi", "fill")


class AblatedInput:
    """Encode images [B, 3, H, W] in [0, 1] with a keep mask [B or 1, H, W] (True = kept).

    ``encoding``: ``"mask"`` (default, 6 channels: x * keep, keep), ``"levine_feizi"`` (6 channels:
    x * keep, (1 - x) * keep) or ``"fill"`` (3 channels, ablated pixels set to ``fill``).
    """

    def __init__(self, encoding: str = "mask", fill: float = 0.5):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown ablation encoding {encoding!r}; expected one of {ENCODINGS}")
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must lie in [0, 1], got {fill}")
        self.encoding = encoding
        self.fill = float(fill)

    @property
    def channels(self) -> int:
        return 3 if self.encoding == "fill" else 6

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if keep.dim() == 2:
            keep = keep.unsqueeze(0)
        k = keep.unsqueeze(1).to(x.dtype)  # [B, 1, H, W]
        if self.encoding == "fill":
            return x * k + self.fill * (1 - k)
        kept = x * k
        if self.encoding == "mask":
            return torch.cat([kept, k.expand_as(x)], dim=1)
        return torch.cat([kept, (1 - x) * k], dim=1)

    def __repr__(self) -> str:
        return f"AblatedInput(encoding={self.encoding!r}" + (f", fill={self.fill})" if self.encoding == "fill" else ")")


def ablation_keep_masks(image_size, band_size: int, mode: str = "column", device=None) -> torch.Tensor:
    """Keep masks of every ablation: bool [A, H, W] (A = W columns, or H * W blocks), bands wrap around."""
    H, W = int(image_size[0]), int(image_size[1])
    if band_size < 1:
        raise ValueError(f"band size must be >= 1, got {band_size}")
    cols = torch.arange(W, device=device)
    starts_c = torch.arange(W, device=device)
    col_keep = (cols[None, :] - starts_c[:, None]) % W < band_size  # [W, W]: band i keeps col (i + t) mod W
    if mode == "column":
        return col_keep[:, None, :].expand(W, H, W).clone()
    if mode == "block":
        rows = torch.arange(H, device=device)
        row_keep = (rows[None, :] - torch.arange(H, device=device)[:, None]) % H < band_size  # [H, H]
        keep = row_keep[:, None, :, None] & col_keep[None, :, None, :]  # [H, W, H, W]
        return keep.reshape(H * W, H, W)
    raise ValueError(f"mode must be 'column' or 'block', got {mode!r}")


def affected_ablations(image_size, patch_size, band_size: int, mode: str = "column") -> int:
    """Δ: how many ablations a patch meets (the same at every position, thanks to the wrap-around)."""
    H, W = int(image_size[0]), int(image_size[1])
    ph, pw = parse_patch_size(patch_size)
    if ph > H or pw > W:
        raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image")
    dc = min(W, pw + band_size - 1)
    if mode == "column":
        return dc
    if mode == "block":
        return min(H, ph + band_size - 1) * dc
    raise ValueError(f"mode must be 'column' or 'block', got {mode!r}")


def certify_counts(counts: torch.Tensor, delta: int):
    """Prediction, certificate and margin from vote counts [N, C] (see the module doc).

    Returns ``(prediction, certified, margin)``; margin = min_{c != y} (n_y - n_c - 2Δ + [c > y]).
    """
    N, C = counts.shape
    counts = counts.long()
    pred = counts.argmax(dim=1)  # ties to the lower class index: the same rule as in the margin below
    n_y = counts.gather(1, pred.view(N, 1))
    cls = torch.arange(C, device=counts.device).view(1, C)
    y_wins_tie = (cls > pred.view(N, 1)).long()  # y keeps a tie against a class of higher index
    m = n_y - counts - 2 * int(delta) + y_wins_tie
    m = m.masked_fill(cls == pred.view(N, 1), torch.iinfo(torch.long).max)
    margin = m.min(dim=1).values
    return pred, margin > 0, margin


class DerandomizedSmoothing(PeerCertifier):
    """De-randomized smoothing with column (default) or block ablation.

    Args:
        band_size: b, the width of the kept band (column) or side of the kept block.
        mode: ``"column"`` or ``"block"``.
        encoding: an :class:`AblatedInput` or its encoding name (default ``"mask"``, 6 channels).
        batch_size: ablated images per base-classifier call.

    The base classifier is any callable ``fn(encoded) -> logits [B, C]`` (an ``nn.Module`` must be
    in eval mode); see :func:`bagcert.peers.ablation_classifier` for a matching 6-channel model.
    """

    def __init__(self, band_size: int = 4, mode: str = "column", encoding="mask", batch_size: int = 512):
        if band_size < 1:
            raise ValueError(f"band size must be >= 1, got {band_size}")
        if mode not in ("column", "block"):
            raise ValueError(f"mode must be 'column' or 'block', got {mode!r}")
        self.band_size = int(band_size)
        self.mode = mode
        self.encoding = encoding if isinstance(encoding, AblatedInput) else AblatedInput(encoding)
        self.batch_size = int(batch_size)
        self.name = f"drs-{mode}-b{band_size}"

    def forward_passes_per_image(self, image_size, patch_size=None) -> int:
        H, W = int(image_size[0]), int(image_size[1])
        return W if self.mode == "column" else H * W

    def _check_fn(self, fn):
        fn = as_classifier(fn)
        if isinstance(fn, BagModel) and self.encoding.channels != 3:
            raise TypeError(
                f"a 3-channel bagcert model cannot read the {self.encoding.channels}-channel ablation encoding "
                f"{self.encoding.encoding!r}: use encoding='fill', or a base classifier built with "
                "bagcert.peers.ablation_classifier(...)"
            )
        return fn

    @torch.no_grad()
    def votes(self, model_or_fn, images: torch.Tensor, return_num_classes: bool = False):
        """The class each ablation votes for: long [N, A] (and the number of classes if asked)."""
        fn = self._check_fn(model_or_fn)
        check_images_for_peer(images)
        N = images.shape[0]
        keep = ablation_keep_masks(images.shape[-2:], self.band_size, self.mode, images.device)
        A = keep.shape[0]

        def build(idx):
            return self.encoding(images[idx // A], keep[idx % A])

        v, C = batched_predictions(fn, N * A, build, self.batch_size, images.device)
        return (v.view(N, A), C) if return_num_classes else v.view(N, A)

    def counts(self, votes: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Vote counts [N, C] from per-ablation votes [N, A]."""
        if votes.numel() and int(votes.max()) >= num_classes:
            raise ValueError(f"a vote for class {int(votes.max())} with only {num_classes} classes")
        out = torch.zeros(votes.shape[0], num_classes, dtype=torch.long, device=votes.device)
        return out.scatter_add_(1, votes, torch.ones_like(votes))

    @torch.no_grad()
    def certify(self, model_or_fn, images: torch.Tensor, labels, patch_size) -> CertResult:
        fn = self._check_fn(model_or_fn)
        check_images_for_peer(images)
        N = images.shape[0]
        labels = check_labels(labels, N, images.device)
        delta = affected_ablations(images.shape[-2:], patch_size, self.band_size, self.mode)
        v, C = self.votes(fn, images, return_num_classes=True)
        if labels is not None and N and labels.max() >= C:
            raise ValueError(f"labels must lie in [0, {C})")
        pred, certified, margin = certify_counts(self.counts(v, C), delta)
        return make_result(pred, labels, certified, margin, patch_size, self.name)

    @torch.no_grad()
    def predict(self, model_or_fn, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        fn = self._check_fn(model_or_fn)
        v, C = self.votes(fn, images, return_num_classes=True)
        return self.counts(v, C).argmax(dim=1)
