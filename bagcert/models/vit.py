"""A small-receptive-field vision transformer: attention inside fixed windows of tokens, one location per window.

The design is PatchCURE's SRF ViT (Xiang et al., "PatchCURE: Improving Certifiable Robustness, Model Utility, and
Computation Efficiency of Adversarial Patch Defenses", USENIX Security 2024; its ``ViT-SRF 14x2``: windows of
14 x 2 tokens of 16 px on a 224 px image, every one of the 12 blocks restricted to its window): the image is cut
into non-overlapping windows, each window's tokens run through the transformer as a sequence of their own, and
the per-token class logits of a window are averaged into one location of the local-logit map.

Layout. Patch embedding: a convolution with kernel = stride = ``patch_size`` p (one token per p x p pixel
patch). The token grid is cut into windows of ``window = (wh, ww)`` tokens (rows x columns; an int for square
windows); tokens beyond the last full window (the bottom / right ``H mod (wh p)`` pixel rows / columns) are
dropped, as a BagNet's unpadded convolutions drop them. A learned position embedding **within the window**
([wh * ww, width], the same for every window, input-independent) is added; ``depth`` pre-norm transformer blocks
(LayerNorm, multi-head self-attention, LayerNorm, GELU MLP) run on each window's tokens only; a final LayerNorm
and a per-token linear head give [wh * ww, C] logits per window, averaged over the window's tokens. No class
token, no global pooling, no absolute position embedding over the image.

Geometry (exact). LayerNorm, the MLP and the head act on one token; attention mixes only tokens of one window;
so the logits of window (i, j) are a function of exactly that window's pixels, rows
``[i wh p, (i + 1) wh p - 1]`` and columns ``[j ww p, (j + 1) ww p - 1]``. That is the box model of
:class:`~bagcert.geometry.Geometry` with receptive field = stride = ``(wh p, ww p)`` and padding 0; the layer
chain per axis is ``(p, p, 0), (w, w, 0)`` (patch embedding, then the window as a kernel-w stride-w step), which
also gives the grid: ``floor(H / (wh p)) x floor(W / (ww p))`` locations. With one location per *token* instead,
every token of a window would see the whole window, whose start is not ``i * S - P`` for a token stride S: the
per-window output is the one that fits the box model exactly. Windows tile the image without overlap, so a
patch reaches only the windows it touches (a 5 x 5 patch on 8 px windows: at most 2 x 2 of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import CIFAR10_MEAN, CIFAR10_STD, BagModel, check_int
from ..geometry_inference import mark_built
from .region import AxisGeometry

__all__ = ["WindowViT"]


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # x: [N, T, width], N = batch * windows: attention never crosses a window
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(round(width * mlp_ratio)))
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _window(window) -> tuple[int, int]:
    if isinstance(window, bool):
        raise ValueError(f"window must be an int or a (rows, columns) pair of ints, got {window!r}")
    if isinstance(window, int):
        window = (window, window)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in window)):
        raise ValueError(f"window must be a positive int or a (rows, columns) pair of positive ints (tokens), got {window!r}")
    return int(window[0]), int(window[1])


class WindowViT(BagModel):
    """PatchCURE-style small-receptive-field ViT (see the module docstring for the design and its geometry).

    Args:
        num_classes: classes (int >= 2).
        patch_size: p, pixels per token side (kernel = stride of the patch embedding).
        window: tokens per window, an int or (rows, columns): receptive field = stride = window * p pixels.
        width: token dimension; a multiple of ``heads``.
        depth: transformer blocks, all windowed.
        heads: attention heads.
        mlp_ratio: MLP hidden size / width.
        aggregation, mean, std: as :class:`~bagcert.models.BagModel` (CIFAR-10 statistics by default).

    ``local_logits(x)``: [B, 3, H, W] in [0, 1] -> [B, num_classes, H // (wh p), W // (ww p)].

    Raises:
        ValueError: a non-positive size, a window that is not an int or a pair of ints, ``width`` not a multiple
            of ``heads``.
    """

    def __init__(self, num_classes: int = 10, patch_size: int = 4, window=2, width: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, aggregation: str = "votes", mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__(num_classes, mean, std, aggregation)
        for name, v in (("patch_size", patch_size), ("width", width), ("depth", depth), ("heads", heads)):
            check_int(name, v)
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.window = _window(window)
        self.patch_size = patch_size
        wh, ww = self.window
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, wh * ww, width))
        self.blocks = nn.Sequential(*[_Block(width, heads, float(mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        p = patch_size
        self.geometry = AxisGeometry.from_axes([(p, p, 0), (wh, wh, 0)], [(p, p, 0), (ww, ww, 0)])
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        mark_built(self)  # the geometry above is derived from the windows built here: trusted by verify_geometry

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)  # [B, width, H // p, W // p]
        b, c = t.shape[:2]
        wh, ww = self.window
        gh, gw = t.shape[2] // wh, t.shape[3] // ww
        t = t[:, :, : gh * wh, : gw * ww]  # tokens of full windows only
        # [B, c, gh, wh, gw, ww] -> [B * gh * gw, wh * ww, c]: every window its own sequence
        t = t.reshape(b, c, gh, wh, gw, ww).permute(0, 2, 4, 3, 5, 1).reshape(b * gh * gw, wh * ww, c)
        t = self.blocks(t + self.pos_embed)
        z = self.head(self.norm(t)).mean(dim=1)  # [B * gh * gw, C]: the window's tokens averaged
        return z.view(b, gh, gw, -1).permute(0, 3, 1, 2)
