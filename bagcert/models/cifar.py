"""Small-receptive-field residual backbones: CIFAR-sized (32 px, stride 1 or 2) and, with stride 4 or 8,
CPU-sized ImageNet-style models (128-224 px).

Layout: a stem (a convolution of kernel k0 at full resolution, then log2(s) strided 3x3 convolutions
that double the width) followed by ``depth`` residual blocks. Each block is
``conv k x k -> BN -> ReLU -> conv 1x1 -> BN`` plus the skip, then ReLU. The first blocks use k = 3
until the receptive field is reached, the rest k = 1 (depth without growing the window). Each 3x3
block widens the receptive field by 2 * s, so

    receptive_field = k0 + 2 (s - 1) + 2 * s * n3        (stride 1: k0 + 2 n3)

and k0 is chosen to hit any receptive field exactly (see :func:`stem_kernel`). ``padding="same"`` keeps
the grid at ceil(H / s) locations per side (border locations also see zero padding),
``padding="valid"`` uses unpadded convolutions (fewer locations, none seeing padding).

Everything is plain conv/BN/ReLU, so it runs fast in channels_last with bf16 autocast. ``norm`` picks the
normalisation: ``"bn"`` (default), ``"gn"`` (group norm, batch-independent), ``"none"``, ``"skipinit"``
(no normalisation; each residual branch is scaled by a learnable scalar that starts at zero, De & Smith,
"Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks", NeurIPS 2020),
which trains 1.3x faster per image than ``"bn"`` on a CPU (docs/benchmarks.md), or ``"nf"`` (SkipInit plus
Scaled Weight Standardization of every convolution but the head and a 1x1 first convolution, as in the
normaliser-free ResNets of Brock et al., "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021: it standardises the weights, not the activations, at about 5 % of the compiled
training step). Without a normalisation the convolutions carry a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry import Geometry
from ..geometry_inference import mark_built
from .base import CIFAR10_MEAN, CIFAR10_STD, BagModel, check_int


class _Block(nn.Module):
    def __init__(self, ch: int, k: int, pad: int, norm: str, dilation: int = 1):
        super().__init__()
        bias = norm in _NORM_FREE
        self.conv1 = nn.Conv2d(ch, ch, k, padding=pad * dilation, dilation=dilation, bias=bias)
        self.n1 = _norm(norm, ch)
        self.conv2 = nn.Conv2d(ch, ch, 1, bias=bias)
        self.n2 = _norm(norm, ch)
        self.act = nn.ReLU(inplace=True)
        self.crop = dilation * (k - 1) // 2 if pad == 0 else 0
        # SkipInit (De & Smith, NeurIPS 2020): no normalisation; the residual branch is scaled by a learnable
        # scalar that starts at zero, so every block starts as the identity, as zero-initialised BN does
        self.gain = nn.Parameter(torch.zeros(())) if norm in ("skipinit", "nf") else None

    def forward(self, x):
        y = self.act(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        if self.gain is not None:
            y = y * self.gain
        if self.crop:
            # centre crop of the skip: the kept pixels lie in the middle of the conv window
            c = self.crop
            x = x[:, :, c:-c, c:-c]
        return self.act(x + y)


_NORM_FREE = ("none", "skipinit", "nf")  # convolutions carry a bias where no normalisation follows them


class ScaledWeightStandardization(nn.Module):
    """Scaled Weight Standardization (Brock et al., ICLR 2021, Eq. 3), a parametrization of a conv's weight.

    For a weight ``W`` of shape [C_out, C_in, k, k] with fan-in ``N = C_in k k``, each output channel's filter is
    centred and scaled to unit variance, then multiplied by ``sqrt(2 / N)`` (He initialisation's ReLU gain, so
    a unit-variance input keeps its second moment through conv + ReLU; the paper's Eq. 3 uses
    ``gamma = sqrt(2 / (1 - 1 / pi))`` for ReLU instead, which keeps the variance) and a learnable per-channel
    ``gain`` (the parameters' dtype, shape [C_out], starts at 1):

        W_hat[i] = gain[i] * sqrt(2 / N) * (W[i] - mean(W[i])) / sqrt(var(W[i]) + eps)

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so ``conv.weight`` *is* the
    standardised weight for every reader (batch-norm folding, geometry checks, exports); the raw weight is
    ``conv.parametrizations.weight.original``. Like batch norm, the layer's output does not change when ``W`` is
    scaled, but it normalises the 16k numbers of a filter bank instead of the activations.
    """

    def __init__(self, out_channels: int, fan_in: int, eps: float = 1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.scale = (2.0 / fan_in) ** 0.5
        self.eps = eps

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        return (w - mean) * torch.rsqrt(var + self.eps) * (self.gain * self.scale).view(-1, 1, 1, 1)


def standardize_weights(model: nn.Module, skip: tuple = ()) -> None:
    """Register :class:`ScaledWeightStandardization` on every ``nn.Conv2d`` of ``model`` except those in ``skip``."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not any(m is s for s in skip):
            fan_in = m.weight[0].numel()
            parametrize.register_parametrization(m, "weight", ScaledWeightStandardization(m.out_channels, fan_in))


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(ch)
    if kind == "gn":
        return nn.GroupNorm(min(32, ch), ch)
    if kind in _NORM_FREE:
        return nn.Identity()
    raise ValueError(f"norm must be 'bn', 'gn', 'none', 'skipinit' or 'nf', got {kind!r}")


def stem_kernel(receptive_field: int, stride: int) -> tuple[int, int]:
    """Return (k0, n3): first-conv kernel and number of 3x3 residual blocks for the receptive field.

    stride 1: conv k0 (s1), then n3 3x3 blocks:            rf = k0 + 2 * n3,      k0 in {3, 4}
    stride s = 2, 4, 8: conv k0 (s1), log2(s) 3x3 convs of stride 2, n3 3x3 blocks:
                                                           rf = k0 + 2 (s - 1) + 2 s n3,  k0 in {1, ..., 2 s}
    """
    if stride not in (1, 2, 4, 8):
        raise ValueError(f"stride must be 1, 2, 4 or 8, got {stride}")
    if receptive_field < 3:
        raise ValueError(f"receptive field must be >= 3, got {receptive_field}")
    if stride == 1:
        rem = (receptive_field - 3) % 2
        k0 = 3 + rem
        return k0, (receptive_field - k0) // 2
    base = 2 * (stride - 1)
    if receptive_field < base + 1:
        raise ValueError(f"receptive field {receptive_field} is too small for stride {stride} (at least {base + 1})")
    rem = (receptive_field - base - 1) % (2 * stride)
    k0 = 1 + rem
    return k0, (receptive_field - k0 - base) // (2 * stride)


class CifarBagNet(BagModel):
    def __init__(
        self,
        num_classes: int = 10,
        receptive_field: int = 9,
        stride: int = 1,
        padding: str = "same",
        width: int = 128,
        depth: int | None = None,
        norm: str = "bn",
        aggregation: str = "votes",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        dense: bool = False,
    ):
        super().__init__(num_classes, mean, std, aggregation)
        if not isinstance(dense, bool):
            raise ValueError(f"dense must be True or False, got {dense!r}")
        if dense and stride == 1:
            raise ValueError("dense=True evaluates a strided network at every pixel; it needs stride 2, 4 or 8, got stride 1")
        if isinstance(stride, bool) or stride not in (1, 2, 4, 8):
            raise ValueError(f"stride must be 1, 2, 4 or 8, got {stride}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        check_int("receptive_field", receptive_field)
        check_int("width", width)
        if depth is not None and (type(depth) is not int or depth < 0):
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        k0, n3 = stem_kernel(receptive_field, stride)
        if depth is None:
            depth = max(4, n3 + 1)
        if depth < n3:
            raise ValueError(
                f"receptive field {receptive_field} at stride {stride} needs at least {n3} 3x3 blocks, "
                f"but depth is {depth}"
            )
        same = padding == "same"
        p0 = (k0 - 1) // 2 if same else 0  # even kernels pad one pixel less on the right: rf box is exact
        if stride == 1:
            self.stem = nn.Sequential(nn.Conv2d(3, width, k0, padding=p0, bias=norm in _NORM_FREE), _norm(norm, width), nn.ReLU(inplace=True))
            chain = [(k0, 1, p0)]
        else:
            # full-resolution first conv with a fraction of the width, then strided 3x3 convs that double
            # the width: the spatial work at full resolution stays cheap and every location still gets
            # 1 + log2(stride) spatial layers before the blocks (stride 2: c0 = width / 2, one strided conv)
            levels = stride.bit_length() - 1
            c0 = max(8, width // stride)
            layers = [nn.Conv2d(3, c0, k0, padding=p0, bias=norm in _NORM_FREE), _norm(norm, c0), nn.ReLU(inplace=True)]
            chain = [(k0, 1, p0)]
            c = c0
            for i in range(levels):
                c_out = width if i == levels - 1 else max(8, width >> (levels - 1 - i))
                # dense: the strided conv runs at stride 1 and every later spatial conv is dilated by the stride
                # it would have followed (a trous), so location 2^(i+1) * o of the dense map is location o here
                d, p = 1 << i if dense else 1, (1 if same else 0)
                conv = nn.Conv2d(c, c_out, 3, stride=1 if dense else 2, padding=p * d, dilation=d, bias=norm in _NORM_FREE)
                layers += [conv, _norm(norm, c_out), nn.ReLU(inplace=True)]
                chain.append((2 * d + 1, 1, p * d) if dense else (3, 2, p))
                c = c_out
            self.stem = nn.Sequential(*layers)
        dil = stride if dense else 1
        blocks = []
        for b in range(depth):
            k = 3 if b < n3 else 1
            pad = (k - 1) // 2 if same else 0
            blocks.append(_Block(width, k, pad, norm, dilation=dil if k > 1 else 1))
            chain.append(((k - 1) * dil + 1, 1, pad * dil) if k > 1 else (k, 1, pad))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.geometry = Geometry.from_layers(chain)
        assert self.geometry.receptive_field[0] == receptive_field
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in blocks:  # start each residual branch near identity (zero-init last norm)
            if isinstance(blk.n2, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.zeros_(blk.n2.weight)
        if norm == "nf":  # after the initialisation above, which writes the raw weights
            # a 1x1 first conv (k0 = 1) is left as it is: centring a filter of 3 numbers, one per colour, would
            # remove the grey direction at every pixel, so the network could not see a grey image at all
            standardize_weights(self, skip=(self.head,) + ((self.stem[0],) if k0 == 1 else ()))
        mark_built(self)  # the geometry above is derived from the layers built here: trusted by verify_geometry

    def features_to_logits(self, x):
        return self.head(self.blocks(self.stem(x)))
