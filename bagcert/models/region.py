"""Standard ResNets as small-receptive-field region scorers: the BagNet recipe applied to a torchvision ResNet.

BagNets (Brendel & Bethge, "Approximating CNNs with Bag-of-local-Features models works surprisingly well on
ImageNet", ICLR 2019) are ResNets whose later 3x3 convolutions are 1x1, so that every output location sees a
small window of the image, and whose classifier is applied at every location instead of after the global
pool. :func:`resnet_to_bagnet` applies that recipe to a trained ``torchvision.models.ResNet`` (``resnet18``,
``resnet34``, ``resnet50``, ... built by the user, with their own weights; bagcert downloads nothing):

* the stem (``conv1``, ``bn1``, ReLU, and the 3x3 stride-2 ``maxpool`` unless ``maxpool=False``) is kept;
* the first ``keep`` spatial (3x3) convolutions of the residual stages, counted in forward order, are kept
  with their weights;
* every later 3x3 convolution becomes a 1x1 convolution whose weight is the **centre tap** of the 3x3 kernel
  (``w[:, :, 1, 1]``), with the same stride and no padding. Because the source pads "same" (padding 1 for a
  3x3 kernel), the centre tap of output ``o`` reads input ``o * stride``: the 1x1 convolution is the 3x3 one
  with its eight outer taps set to zero, on the same grid, so the residual additions still line up;
* the global average pool and ``fc`` become a 1x1 convolution ``fc`` applied at every location: the same
  matrix when ``num_classes`` equals ``fc.out_features`` (the mean of the local logits then equals ``fc`` of
  the pooled features), otherwise a new classifier to train;
* ``layer_strides`` can lower a stage's stride to 1 (BagNet runs at stride 8 where a ResNet runs at 32): the
  weights stay the same, the locations get denser.

The converted network is a different function from the source (a ResNet's accuracy does not survive the
removal of its outer taps without fine-tuning; BagNets are trained as such), but it starts from the source's
weights and keeps its parameter names (``conv1``, ``bn1``, ``layerS.B.convK``, ``layerS.B.downsample.{0,1}``,
``fc``), so ``model.state_dict()`` reads like the source's.

Geometry. The receptive field, stride and padding are composed, per axis, from the actual layer chain
(stem convolution, max-pool, and each block's main path, with dilation) by :meth:`Geometry.from_layers`. Each
block's shortcut (identity or the 1x1 strided ``downsample``) is checked at construction to read a subset of
its main path's window on the same grid, and the addition refuses maps of different sizes, so the composed
box is a superset of every pixel a location's logits can depend on; with ``maxpool=False`` and positive weights
it is exactly the set (``tests/test_region_models.py`` probes both with autograd). Zero padding and the
max-pool's padding are constants, not pixels, so border locations simply see a clipped box.

timm: its plain ``resnet18`` / ``resnet34`` / ``resnet50`` use the same parameter names as torchvision's
(``conv1``, ``bn1``, ``layerS.B.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``, ``fc``), so their state
dict loads into ``torchvision.models.resnet50(weights=None)`` and the result converts. timm's module objects
themselves (extra ``act``/``aa``/``se``/``drop_path`` children) and variants with a deep stem, average-pool
shortcuts or squeeze-excitation (which pools globally) are refused. timm is not a dependency; this path is not
tested against timm here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..geometry import Geometry
from .base import IMAGENET_MEAN, IMAGENET_STD, BagModel

__all__ = ["AxisGeometry", "RegionResNet", "resnet_to_bagnet", "resnet_receptive_fields", "resnet_bagnet"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")
_BASIC = ("conv1", "bn1", "conv2", "bn2")
_BOTTLENECK = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
_TOP_LEVEL = {"conv1", "bn1", "relu", "maxpool", *_STAGES, "avgpool", "fc"}


# --- geometry with a different chain per axis --------------------------------------------------------
@dataclass(frozen=True)
class AxisGeometry(Geometry):
    """A :class:`Geometry` whose rows and columns come from different layer chains (rectangular kernels or
    windows). ``layers`` is the rows' chain (kernel, stride, padding), ``layers_cols`` the columns'."""

    layers_cols: tuple = ()

    @classmethod
    def from_axes(cls, rows, cols) -> Geometry:
        """Compose per-axis chains ``[(kernel, stride, padding), ...]``; a plain :class:`Geometry` when they agree."""
        rows = tuple((int(k), int(s), int(p)) for k, s, p in rows)
        cols = tuple((int(k), int(s), int(p)) for k, s, p in cols)
        gr, gc = Geometry.from_layers(rows), Geometry.from_layers(cols)
        if rows == cols:
            return gr
        return cls(
            (gr.receptive_field[0], gc.receptive_field[0]), (gr.stride[0], gc.stride[0]),
            (gr.padding[0], gc.padding[0]), rows, layers_cols=cols,
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return _chain_grid(self.layers, height), _chain_grid(self.layers_cols, width)

    def min_input_size(self) -> int:
        n = 1
        while min(self.grid_size(n, n)) < 1:
            n += 1
        return n


def _chain_grid(layers, n: int) -> int:
    for k, s, p in layers:
        n = (n + 2 * p - k) // s + 1
        if n <= 0:
            return 0
    return n


def _box(chain) -> tuple[int, int, int]:
    """(receptive field, jump, start offset) of a chain: output o reads [o * jump + start, ... + rf - 1]."""
    g = Geometry.from_layers(chain) if chain else Geometry((1, 1), (1, 1), (0, 0), ())
    return g.receptive_field[0], g.stride[0], -g.padding[0]


# --- reading the source's layers ---------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_specs(conv: nn.Conv2d, where: str) -> tuple[tuple, tuple]:
    """Per-axis (effective kernel, stride, padding) of a convolution; refuses what the box model can't express."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"{where}: padding_mode {conv.padding_mode!r} is not supported (expected 'zeros': circular "
                         "or reflected padding reads pixels outside a location's window)")
    k, s, d = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    keff = tuple(d[a] * (k[a] - 1) + 1 for a in range(2))
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            p = (0, 0)
        elif all(e % 2 == 1 for e in keff):  # "same" with an odd window pads symmetrically
            p = tuple((e - 1) // 2 for e in keff)
        else:
            raise ValueError(f"{where}: padding='same' with an even kernel pads asymmetrically; not supported")
    else:
        p = _pair(conv.padding)
    return tuple((keff[a], s[a], p[a]) for a in range(2))


def _pool_specs(pool: nn.Module, where: str) -> tuple[tuple, tuple] | None:
    if isinstance(pool, nn.Identity) or pool is None:
        return None
    if not isinstance(pool, nn.MaxPool2d):
        raise ValueError(f"{where}: expected nn.MaxPool2d or nn.Identity, got {type(pool).__name__}")
    if pool.ceil_mode:
        raise ValueError(f"{where}: ceil_mode=True is not supported (the last window would overhang the box model)")
    k, s, p, d = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding), _pair(pool.dilation)
    return tuple((d[a] * (k[a] - 1) + 1, s[a], p[a]) for a in range(2))


def _check_norm(m: nn.Module, where: str) -> None:
    """Only per-channel affine normalisations keep locations independent (in eval mode)."""
    ok = isinstance(m, (nn.BatchNorm2d, nn.Identity)) or type(m).__name__ == "FrozenBatchNorm2d"
    if not ok:
        raise ValueError(f"{where}: {type(m).__name__} is not supported (expected BatchNorm2d: a normalisation over "
                         "the spatial map, such as GroupNorm or LayerNorm, mixes every location)")


def _block_kind(block: nn.Module, where: str) -> tuple[str, ...]:
    names = {n for n, _ in block.named_children()}
    kind = _BOTTLENECK if "conv3" in names else _BASIC
    extra = names - set(kind) - {"relu", "downsample"}
    missing = set(kind) - names
    if missing or extra:
        raise ValueError(
            f"{where} is a {type(block).__name__} with children {sorted(names)}; expected torchvision's BasicBlock "
            f"({', '.join(_BASIC)}, relu, downsample) or Bottleneck ({', '.join(_BOTTLENECK)}, relu, downsample)"
            + (" (timm blocks: load their state dict into the torchvision model of the same depth)" if extra else "")
        )
    for n in kind:
        if n.startswith("conv") and not isinstance(getattr(block, n), nn.Conv2d):
            raise ValueError(f"{where}.{n} is a {type(getattr(block, n)).__name__}; expected nn.Conv2d")
        if n.startswith("bn"):
            _check_norm(getattr(block, n), f"{where}.{n}")
    return kind


def _downsample_conv(block: nn.Module, where: str) -> nn.Conv2d | None:
    ds = getattr(block, "downsample", None)
    if ds is None:
        return None
    mods = list(ds) if isinstance(ds, nn.Sequential) else [ds]
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or any(not isinstance(m, nn.Conv2d) and not isinstance(m, (nn.BatchNorm2d, nn.Identity))
                              and type(m).__name__ != "FrozenBatchNorm2d" for m in mods):
        raise ValueError(f"{where}.downsample must be one Conv2d followed by a BatchNorm2d (torchvision's), got "
                         f"{[type(m).__name__ for m in mods]}")
    return convs[0]


def _source_stage_stride(stage: nn.Sequential) -> int:
    first = stage[0]
    strides = [max(_pair(m.stride)) for m in first.modules() if isinstance(m, nn.Conv2d)]
    return max(strides) if strides else 1


def _is_spatial(conv: nn.Conv2d) -> bool:
    return any(k > 1 for k in _pair(conv.kernel_size))


def _center_tap(conv: nn.Conv2d, where: str) -> nn.Conv2d:
    """The 1x1 convolution equal to ``conv`` with every tap but the centre one zeroed (same stride, same grid)."""
    k, d = _pair(conv.kernel_size), _pair(conv.dilation)
    rows, cols = _conv_specs(conv, where)
    for a, (keff, _, p) in enumerate((rows, cols)):
        if k[a] % 2 == 0 or p != (keff - 1) // 2:
            raise ValueError(
                f"{where}: a {k[0]}x{k[1]} kernel with padding {p} (axis {a}) has no centre tap on the output grid; "
                "expected an odd kernel with 'same' padding ((kernel - 1) / 2 * dilation), as torchvision's"
            )
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, padding=0, groups=conv.groups,
                    bias=conv.bias is not None).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, :, k[0] // 2, k[1] // 2, None, None])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new


# --- the converted model ------------------------------------------------------------------------------
class _RegionBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck with the same children and forward, whose residual addition
    refuses maps of different sizes (broadcasting a 1x1 map would mix locations)."""

    def __init__(self, children: dict):
        super().__init__()
        for name, module in children.items():
            setattr(self, name, module)
        self.bottleneck = "conv3" in children
        if "downsample" not in children:
            self.downsample = None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        identity = x if self.downsample is None else self.downsample(x)
        if identity.shape != out.shape:
            raise RuntimeError(f"residual shapes differ: {tuple(identity.shape)} and {tuple(out.shape)}")
        return self.relu(out + identity)


class RegionResNet(BagModel):
    """A ResNet turned into a BagNet-style region scorer; build it with :func:`resnet_to_bagnet`.

    ``local_logits(x)``: images [B, 3, H, W] in [0, 1] -> [B, num_classes, h, w];
    ``features(x)``: normalised images -> the last stage's features [B, F, h, w] (``fc`` is the 1x1 head on them);
    ``conversion``: what was kept and converted (a dict of builtins, see :func:`resnet_to_bagnet`).
    """

    def __init__(self, num_classes, mean, std, aggregation="votes"):
        super().__init__(num_classes, mean, std, aggregation)
        self.conversion: dict = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _plan(resnet: nn.Module, keep, maxpool: bool, layer_strides):
    """Check the source and return (spatial conv names in forward order, stage strides after the override)."""
    if not isinstance(resnet, nn.Module):
        raise TypeError(f"resnet must be a torch.nn.Module (a torchvision ResNet), got {type(resnet).__name__}")
    names = {n for n, _ in resnet.named_children()}
    missing = [n for n in ("conv1", "bn1", *_STAGES, "fc") if n not in names]
    if missing:
        raise ValueError(
            f"resnet lacks {', '.join(missing)}; expected a torchvision ResNet (conv1, bn1, relu, maxpool, "
            f"layer1..layer4, avgpool, fc), got a {type(resnet).__name__} with {sorted(names)}"
        )
    unknown = sorted(n for n in names - _TOP_LEVEL if any(True for _ in getattr(resnet, n).parameters()))
    if unknown:
        raise ValueError(f"resnet has modules with weights the conversion does not know: {', '.join(unknown)}")
    if not isinstance(resnet.conv1, nn.Conv2d) or resnet.conv1.in_channels != 3:
        raise ValueError(f"resnet.conv1 must be an nn.Conv2d on 3 input channels, got {resnet.conv1!r}")
    _check_norm(resnet.bn1, "resnet.bn1")
    if not isinstance(resnet.fc, nn.Linear):
        raise ValueError(f"resnet.fc must be an nn.Linear classifier, got {type(resnet.fc).__name__}")
    if not isinstance(maxpool, bool):
        raise TypeError(f"maxpool must be True or False, got {maxpool!r}")
    source_strides = tuple(_source_stage_stride(getattr(resnet, s)) for s in _STAGES)
    if layer_strides is None:
        layer_strides = source_strides
    if (not isinstance(layer_strides, (tuple, list)) or len(layer_strides) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_strides)):
        raise TypeError(f"layer_strides must be 4 ints (one per stage), got {layer_strides!r}")
    for i, (want, have) in enumerate(zip(layer_strides, source_strides)):
        if want not in (1, have):
            raise ValueError(
                f"layer_strides[{i}] (layer{i + 1}) is {want}; a stage's stride can stay the source's ({have}) or "
                "become 1 (a stride the source does not have would need a shortcut it lacks)"
            )
    spatial = []
    for s in _STAGES:
        stage = getattr(resnet, s)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise ValueError(f"resnet.{s} must be a non-empty nn.Sequential of residual blocks")
        for b, block in enumerate(stage):
            kind = _block_kind(block, f"resnet.{s}.{b}")
            _downsample_conv(block, f"resnet.{s}.{b}")
            spatial += [f"{s}.{b}.{n}" for n in kind if n.startswith("conv") and _is_spatial(getattr(block, n))]
    if keep == "all":
        keep = len(spatial)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(spatial):
        raise ValueError(f"keep must be an int in [0, {len(spatial)}] (the source's 3x3 convolutions) or 'all', got {keep!r}")
    return spatial, keep, tuple(layer_strides)


def _convert(resnet, num_classes, mean, std, keep, maxpool, layer_strides, aggregation):
    spatial, keep, layer_strides = _plan(resnet, keep, maxpool, layer_strides)
    kept, converted = spatial[:keep], spatial[keep:]
    model = RegionResNet(num_classes, mean, std, aggregation)
    dev = resnet.conv1.weight.device
    model.conv1 = copy.deepcopy(resnet.conv1)
    model.bn1 = copy.deepcopy(resnet.bn1)
    model.relu = nn.ReLU(inplace=True)
    source_pool = getattr(resnet, "maxpool", None)
    model.maxpool = copy.deepcopy(source_pool) if maxpool and source_pool is not None else nn.Identity()
    rows, cols = [], []
    stem = [_conv_specs(model.conv1, "resnet.conv1"), _pool_specs(model.maxpool, "resnet.maxpool")]
    for spec in stem:
        if spec is not None:
            rows.append(spec[0])
            cols.append(spec[1])
    for si, s in enumerate(_STAGES):
        blocks = []
        for b, block in enumerate(getattr(resnet, s)):
            where = f"resnet.{s}.{b}"
            kind = _block_kind(block, where)
            children = {}
            main_r, main_c = [], []
            for n in kind:
                m = getattr(block, n)
                if n.startswith("conv"):
                    m = _center_tap(m, f"{where}.{n}") if f"{s}.{b}.{n}" in converted else copy.deepcopy(m)
                    if b == 0 and layer_strides[si] == 1 and max(_pair(m.stride)) > 1:
                        m.stride = (1, 1)
                    r, c = _conv_specs(m, f"{where}.{n}")
                    main_r.append(r)
                    main_c.append(c)
                else:
                    m = copy.deepcopy(m)
                children[n] = m
            ds = copy.deepcopy(block.downsample) if getattr(block, "downsample", None) is not None else None
            short_r, short_c = [], []
            if ds is not None:
                conv = next(m for m in ds.modules() if isinstance(m, nn.Conv2d))
                if b == 0 and layer_strides[si] == 1 and max(_pair(conv.stride)) > 1:
                    conv.stride = (1, 1)
                r, c = _conv_specs(conv, f"{where}.downsample")
                short_r, short_c = [r], [c]
                children["downsample"] = ds
            for axis, main, short in (("rows", main_r, short_r), ("columns", main_c, short_c)):
                rm, jm, om = _box(main)
                rs, js, os_ = _box(short)
                if jm != js or os_ < om or os_ + rs > om + rm:
                    raise ValueError(
                        f"{where}: the shortcut reads [{os_}, {os_ + rs - 1}] + {js} o along the {axis}, outside the main "
                        f"path's window [{om}, {om + rm - 1}] + {jm} o: the block's geometry has no box"
                    )
            rows += main_r
            cols += main_c
            blocks.append(_RegionBlock(children))
        setattr(model, s, nn.Sequential(*blocks))
    features = resnet.fc.in_features
    last = getattr(model, _STAGES[-1])[-1]
    out_ch = (last.conv3 if last.bottleneck else last.conv2).out_channels
    if out_ch != features:
        raise ValueError(f"resnet.fc reads {features} features but layer4 gives {out_ch}")
    model.fc = nn.Conv2d(features, num_classes, 1)
    reused = resnet.fc.out_features == num_classes
    with torch.no_grad():
        if reused:
            model.fc.weight.copy_(resnet.fc.weight[:, :, None, None])
            if resnet.fc.bias is not None:
                model.fc.bias.copy_(resnet.fc.bias)
            else:
                model.fc.bias.zero_()
        else:
            nn.init.normal_(model.fc.weight, std=0.01)
            nn.init.zeros_(model.fc.bias)
    model.geometry = AxisGeometry.from_axes(rows, cols)
    g = model.geometry
    model.conversion = {
        "keep": keep,
        "kept": kept,
        "converted": converted,
        "maxpool": not isinstance(model.maxpool, nn.Identity),
        "layer_strides": list(layer_strides),
        "head": "reused" if reused else "new",
        "receptive_field": list(g.receptive_field),
        "stride": list(g.stride),
        "padding": list(g.padding),
        "summary": (
            f"kept the stem and {len(kept)} of {len(spatial)} 3x3 convolutions, converted {len(converted)} to 1x1 "
            f"(centre tap); head {'reused from fc' if reused else f'new ({num_classes} classes)'}; receptive field "
            f"{g.receptive_field[0]}x{g.receptive_field[1]}, stride {g.stride[0]}x{g.stride[1]}, padding "
            f"{g.padding[0]}x{g.padding[1]}"
        ),
    }
    return model.to(device=dev, dtype=resnet.conv1.weight.dtype)


def _check_stats(name, v):
    if (not isinstance(v, (tuple, list)) or len(v) != 3
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in v)):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel, for [0, 1] images), got {v!r}")
    if name == "std" and not all(t > 0 for t in v):
        raise ValueError(f"std must be positive, got {v!r}")


def resnet_to_bagnet(resnet: nn.Module, *, num_classes: int, mean, std, keep=1, maxpool: bool = True,
                     layer_strides=None, aggregation: str = "votes") -> RegionResNet:
    """Turn a torchvision ResNet into a BagNet-style region scorer (Brendel & Bethge, ICLR 2019), reusing its weights.

    See the module docstring for the recipe. The source is not modified; the result is a new module on the
    source's device, in eval mode.

    Args:
        resnet: a ``torchvision.models.ResNet`` (``resnet18`` ... ``resnet152``, ``resnext*``, ``wide_resnet*``,
            a CIFAR-style stem with a 3x3 ``conv1`` and ``maxpool = nn.Identity()`` included) with the user's
            weights. Its norms must be BatchNorm2d (or FrozenBatchNorm2d).
        num_classes: classes of the per-location head (int >= 2); equal to ``resnet.fc.out_features`` reuses
            ``fc`` as the 1x1 head, otherwise the head is new (normal init, std 0.01) and must be trained.
        mean, std: the 3 per-channel statistics the source was trained with, for [0, 1] images (torchvision's
            ImageNet models: ``bagcert.models.base.IMAGENET_MEAN`` / ``IMAGENET_STD``).
        keep: how many of the residual stages' 3x3 convolutions (in forward order; a BasicBlock has two, a
            Bottleneck one) keep their 3x3 kernel; the rest become 1x1. ``"all"`` keeps every one (the ResNet
            itself with the pooling moved after the classifier). :func:`resnet_receptive_fields` lists the
            receptive field of every choice; ``model.geometry`` and ``model.conversion`` report the result.
        maxpool: keep the stem's max-pool (False drops it: stride / 2, a smaller receptive field).
        layer_strides: 4 ints, the stride of each stage: the source's (None, default) or 1 for any stage
            (e.g. ``(1, 2, 2, 1)``): the strided 3x3 (or 1x1) and its ``downsample`` run at stride 1.
        aggregation: the model's default aggregation (``"votes"``).

    Returns:
        a :class:`RegionResNet` with an exact :class:`~bagcert.geometry.Geometry` and ``model.conversion``:
        ``keep``, ``kept`` / ``converted`` (names of the 3x3 convolutions, e.g. ``"layer1.0.conv1"``), ``maxpool``,
        ``layer_strides``, ``head`` (``"reused"`` / ``"new"``), ``receptive_field``, ``stride``, ``padding``
        ([rows, columns], pixels) and ``summary`` (one line). ``model.config`` names the registry entry
        ``resnet_bagnet`` that rebuilds the architecture when the source is a standard torchvision ResNet (then
        :func:`bagcert.save_checkpoint` works), else it is empty.

    Raises:
        TypeError: ``resnet`` is not a module; ``layer_strides`` not 4 ints; ``maxpool`` not a bool.
        ValueError: a module the box geometry can't express (a norm over the spatial map, circular padding, a
            max-pool with ceil_mode, an even 3x3-to-be-converted kernel, blocks other than torchvision's), a
            stage stride other than the source's or 1, ``keep`` out of range, bad ``num_classes`` / ``mean`` / ``std``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    _check_stats("mean", mean)
    _check_stats("std", std)
    model = _convert(resnet, num_classes, tuple(mean), tuple(std), keep, maxpool, layer_strides, aggregation)
    model.config = _registry_config(resnet, model, num_classes, mean, std, maxpool, layer_strides, aggregation)
    return model.eval()


def resnet_receptive_fields(resnet: nn.Module, *, maxpool: bool = True, layer_strides=None) -> list[dict]:
    """The geometry of every ``keep`` choice of :func:`resnet_to_bagnet` for this source.

    Returns:
        ``[{"keep": k, "receptive_field": [rows, cols], "stride": [rows, cols], "padding": [rows, cols]}, ...]``
        for ``k = 0 .. number of 3x3 convolutions`` (pixels).
    """
    spatial, _, layer_strides = _plan(resnet, 0, maxpool, layer_strides)
    out = []
    for k in range(len(spatial) + 1):
        rows, cols = _source_chain(resnet, set(spatial[k:]), maxpool, layer_strides)
        out.append({"keep": k, **AxisGeometry.from_axes(rows, cols).to_dict()})
    return out


def _source_chain(resnet, converted: set, maxpool: bool, layer_strides) -> tuple[list, list]:
    """The per-axis main-path chains the conversion will have, read from the source's layers without building it
    (a converted convolution is (1, stride, 0))."""
    rows, cols = [], []
    pool = getattr(resnet, "maxpool", None) if maxpool else None
    for spec in (_conv_specs(resnet.conv1, "resnet.conv1"), _pool_specs(pool, "resnet.maxpool")):
        if spec is not None:
            rows.append(spec[0])
            cols.append(spec[1])
    for si, s in enumerate(_STAGES):
        for b, block in enumerate(getattr(resnet, s)):
            for n in _block_kind(block, f"resnet.{s}.{b}"):
                if not n.startswith("conv"):
                    continue
                r, c = _conv_specs(getattr(block, n), f"resnet.{s}.{b}.{n}")
                if f"{s}.{b}.{n}" in converted:
                    r, c = (1, r[1], 0), (1, c[1], 0)
                if b == 0 and layer_strides[si] == 1:
                    r, c = (r[0], 1, r[2]), (c[0], 1, c[2])
                rows.append(r)
                cols.append(c)
    return rows, cols


# --- the registry entry -----------------------------------------------------------------------------------
_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _torchvision_resnet(arch: str, num_classes: int, stem: str):
    import torchvision

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {', '.join(_ARCHS)}, got {arch!r}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' (7x7 stride-2 conv + max-pool) or 'cifar' (3x3 stride-1 conv, "
                         f"no max-pool), got {stem!r}")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def resnet_bagnet(arch: str = "resnet18", num_classes: int = 10, keep=1, stem: str = "imagenet", maxpool: bool = True,
                  layer_strides=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, aggregation: str = "votes") -> RegionResNet:
    """Registry factory ``resnet_bagnet``: ``torchvision.models.<arch>(weights=None)`` converted by
    :func:`resnet_to_bagnet` (random weights; to train, or to load a converted model's state dict into).

    ``stem="cifar"`` replaces ``conv1`` by a 3x3 stride-1 convolution and drops the max-pool (the usual
    CIFAR ResNet). Other arguments as :func:`resnet_to_bagnet`.
    """
    net = _torchvision_resnet(arch, num_classes, stem)
    if layer_strides is not None:
        layer_strides = tuple(layer_strides)  # a checkpoint stores a list
    return resnet_to_bagnet(net, num_classes=num_classes, mean=mean, std=std, keep=keep, maxpool=maxpool,
                            layer_strides=layer_strides, aggregation=aggregation).train()


def _registry_config(resnet, model, num_classes, mean, std, maxpool, layer_strides, aggregation) -> dict:
    """``{"name": "resnet_bagnet", "kwargs": ...}`` when a torchvision arch rebuilds ``model``'s exact state dict."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    conv1 = resnet.conv1
    stem = "cifar" if (_pair(conv1.kernel_size), _pair(conv1.stride)) == ((3, 3), (1, 1)) else "imagenet"
    for arch in _ARCHS:
        kwargs = {"arch": arch, "num_classes": num_classes, "keep": model.conversion["keep"], "stem": stem,
                  "maxpool": maxpool, "layer_strides": None if layer_strides is None else list(layer_strides), "mean": list(mean),
                  "std": list(std), "aggregation": aggregation}
        depth = sum(len(getattr(resnet, s)) for s in _STAGES)
        if depth != {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}[arch]:
            continue
        with torch.device("meta"):
            net = _torchvision_resnet(arch, num_classes, stem)
            try:
                other = _convert(net, num_classes, tuple(mean), tuple(std), kwargs["keep"], maxpool, layer_strides,
                                 aggregation)
            except ValueError:
                continue
        if {k: tuple(v.shape) for k, v in other.state_dict().items()} == want and other.geometry == model.geometry:
            return {"name": "resnet_bagnet", "kwargs": kwargs}
    return {}
