"""Batch tensor transforms for training the base classifiers of the model-agnostic peers.

* :func:`random_ablation`: de-randomized smoothing training input. Each image gets its own random
  band (column mode: one start column in [0, W); block mode: a start row and column), wrapping
  around like at certification time, and is encoded with :class:`~bagcert.peers.AblatedInput`.
* :func:`random_masks`: PatchCleanser training input. Each image gets ``num_masks`` masks drawn
  uniformly from the certification mask set (two masks imitate the second round), filled with
  ``fill``.

Both take float images [B, 3, H, W] in [0, 1] and draw every random number from the given
``torch.Generator`` (CPU), so a seed reproduces a batch exactly. Nothing here seeds global RNGs.

Data parallelism: like :func:`bagcert.data.augment_batch`, both accept ``rows`` (the rows of the
global batch that ``x`` holds) and ``global_size`` (the global batch size). The random numbers are
then drawn for the whole global batch and ``rows`` of them are used, so each image is transformed
exactly as in a one-process run. Without them the batch is its own global batch (the same draws as
``rows = arange(B)``, ``global_size = B``).
"""

from __future__ import annotations

import torch

from .patchcleanser import MaskSet
from .smoothing import AblatedInput

__all__ = ["random_ablation", "random_masks"]


def _check(x: torch.Tensor):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images [B, C, H, W] in [0, 1], got {getattr(x, 'shape', type(x))}")


def _rows(B: int, rows, global_size):
    n = B if global_size is None else int(global_size)
    sel = torch.arange(B) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
    if sel.shape != (B,):
        raise ValueError(f"rows must list one global row per image ({B}), got shape {tuple(sel.shape)}")
    if B and (int(sel.min()) < 0 or int(sel.max()) >= n):
        raise ValueError(f"rows must lie in [0, {n}) (the global batch), got {sel.min().item()}..{sel.max().item()}")
    return n, sel


def random_ablation(
    x: torch.Tensor,
    band_size: int,
    generator: torch.Generator,
    mode: str = "column",
    encoding="mask",
    return_starts: bool = False,
    rows=None,
    global_size: int | None = None,
):
    """Ablate every image to one random band (or block) and encode it.

    Returns the encoded batch [B, 6 or 3, H, W] (and the starts, long [B] for columns or [B, 2] for
    blocks (row, col), with ``return_starts=True``). ``rows`` / ``global_size``: see the module doc.
    """
    _check(x)
    if band_size < 1:
        raise ValueError(f"band size must be >= 1, got {band_size}")
    enc = encoding if isinstance(encoding, AblatedInput) else AblatedInput(encoding)
    B, _, H, W = x.shape
    n, sel = _rows(B, rows, global_size)
    cols = torch.arange(W, device=x.device)
    sc = torch.randint(0, W, (n,), generator=generator)[sel].to(x.device)
    keep_c = (cols[None, :] - sc[:, None]) % W < band_size  # [B, W]
    if mode == "column":
        keep = keep_c[:, None, :].expand(B, H, W)
        starts = sc
    elif mode == "block":
        sr = torch.randint(0, H, (n,), generator=generator)[sel].to(x.device)
        rows = torch.arange(H, device=x.device)
        keep_r = (rows[None, :] - sr[:, None]) % H < band_size  # [B, H]
        keep = keep_r[:, :, None] & keep_c[:, None, :]
        starts = torch.stack([sr, sc], dim=1)
    else:
        raise ValueError(f"mode must be 'column' or 'block', got {mode!r}")
    out = enc(x, keep)
    return (out, starts) if return_starts else out


def random_masks(
    x: torch.Tensor,
    mask_set: MaskSet,
    generator: torch.Generator,
    num_masks: int = 1,
    fill: float = 0.5,
    return_index: bool = False,
    rows=None,
    global_size: int | None = None,
):
    """Mask every image with ``num_masks`` masks drawn uniformly (with replacement) from ``mask_set``.

    Returns the masked batch [B, C, H, W] (and the mask indices, long [B, num_masks], with
    ``return_index=True``). ``rows`` / ``global_size``: see the module doc.
    """
    _check(x)
    if tuple(x.shape[-2:]) != tuple(mask_set.image_size):
        raise ValueError(f"mask set is for {mask_set.image_size} images, got {tuple(x.shape[-2:])}")
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    masks = mask_set.masks(x.device)
    n, sel = _rows(x.shape[0], rows, global_size)
    idx = torch.randint(0, masks.shape[0], (n, num_masks), generator=generator)[sel].to(x.device)
    union = masks[idx].any(dim=1)  # [B, H, W]
    out = x.masked_fill(union[:, None], float(fill))
    return (out, idx) if return_index else out
