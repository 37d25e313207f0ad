"""Inference-optimised evaluation of bagcert models for certification, with per-image results that do not
depend on how the images are batched.

What certification runs (``bagcert.certify``, ``bagcert certify``) instead of ``model.local_logits``:

* **A fused copy** (:func:`inference_copy`): batch norm at inference is an affine map per channel, so it is folded
  into the convolution before it (``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``,
  computed in float64 and rounded once). The copy is used only under ``torch.no_grad`` in eval mode; the trained
  module, its ``state_dict`` and checkpoints are untouched. Group norm depends on the image and stays as it is;
  SkipInit's scalar gain is folded into the convolution it scales.
* **The dense (a trous) model without dilated convolutions**: a convolution of dilation ``d`` on an [H, W] map
  whose sides are multiples of ``d`` equals the undilated convolution applied separately to the ``d * d`` pixel
  sub-grids ``x[..., a::d, b::d]`` ("space-to-batch"; the sub-grids are stacked along the batch and interleaved
  back at the end). The zero padding agrees: sub-grid position ``i - 1`` (or ``n``) lies outside the sub-grid
  exactly when pixel ``a + d (i - 1)`` (or ``a + d n``) lies outside the map, so 'same' and 'valid' padding give
  the a trous result at every location, borders included (``tests/test_inference.py`` checks it against the
  dilated model). Undilated convolutions hit the fast kernels; dilated ones miss them, worst in channels_last.
  Image sizes whose maps are not multiples of the dilation fall back to the dilated convolutions (same results).
* **channels_last** memory format for the convolutions on the CPU (oneDNN's fast layout there).
* **A fixed chunk shape** (:func:`chunk_size`): the network always runs on exactly ``chunk`` images (the last
  chunk is filled up with copies of its last image, whose results are dropped). Kernels may pick another
  algorithm (another summation order) for another batch shape, which moves a logit by ~1e-5 and could flip a
  vote at the threshold 0; for one shape each image's row is computed the same way wherever it sits in the
  batch, so an image's logits are bit-identical for every batch size, process count and data path.
* **precision "bf16"** (opt-in): the fused copy runs under ``torch.autocast(dtype=torch.bfloat16)``; the logits
  are returned as float32. The certificate is then that of the model as evaluated in bf16 (sound for that
  model; its predictions may differ from the float32 model's).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

__all__ = ["PRECISIONS", "InferenceModel", "inference_copy", "chunk_size", "evaluate_local_logits", "check_precision"]

PRECISIONS = ("fp32", "bf16")
# memory for the activations of one chunk (float32); the chunk size follows from it and the image size only
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK = 32


def check_precision(precision, device="cpu") -> str:
    """``precision`` checked: ``"fp32"`` or ``"bf16"``. Raises ``ValueError`` for any other value and for bf16 on
    a device without bf16 autocast (a CUDA GPU without bf16 support, or a device other than cpu / cuda)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16: the GPU {torch.cuda.get_device_name(dev)} does not support bfloat16; use fp32")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"precision bf16 is supported on cpu and cuda, not on {dev.type}; use fp32")
    return precision


# ---------------------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------------------
def _fold(conv: nn.Conv2d, bn: nn.Module | None = None, gain: torch.Tensor | None = None, *, dilation=None,
          padding=None) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` (eval-mode batch norm) times ``gain``, optionally with another
    dilation / padding (the space-to-batch form). Folded in float64, rounded once to the weight dtype."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
    elif bn is not None and not isinstance(bn, nn.Identity):
        raise TypeError(f"cannot fold {type(bn).__name__}")
    if gain is not None:
        g = gain.detach().double()
        w, b = w * g, b * g
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding if padding is None else padding,
                    dilation=conv.dilation if dilation is None else dilation, groups=conv.groups, bias=True)
    out = out.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    out.requires_grad_(False)
    return out


def _foldable(norm) -> bool:
    return isinstance(norm, (nn.BatchNorm2d, nn.Identity))


class _ConvNormAct(nn.Module):
    """conv -> norm -> ReLU with the norm folded into the conv where it is batch norm (or absent); group norm
    depends on the image and is kept after the conv."""

    def __init__(self, conv, norm, act: bool, gain=None, **geom):
        super().__init__()
        if _foldable(norm):
            self.conv, self.norm = _fold(conv, norm, gain, **geom), None
        else:
            self.conv, self.norm = _fold(conv, None, **geom), copy.deepcopy(norm).requires_grad_(False)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return torch.relu_(x) if self.act else x


class _CifarBlock(nn.Module):
    """The fused :class:`bagcert.models.cifar._Block` (SkipInit's gain folded into conv2 unless group norm follows it)."""

    def __init__(self, blk, crop: int, **geom):
        super().__init__()
        self.c1 = _ConvNormAct(blk.conv1, blk.n1, True, **geom)
        if _foldable(blk.n2):
            self.c2, self.gain = _ConvNormAct(blk.conv2, blk.n2, False, gain=blk.gain), None
        else:
            self.c2 = _ConvNormAct(blk.conv2, blk.n2, False)
            self.gain = None if blk.gain is None else blk.gain.detach().clone()
        self.crop = crop

    def forward(self, x):
        y = self.c2(self.c1(x))
        if self.gain is not None:
            y = y * self.gain
        if self.crop:
            c = self.crop
            x = x[:, :, c:-c, c:-c]
        return torch.relu_(x + y)


class _NotDivisible(Exception):
    pass


class _SpaceToBatch(nn.Module):
    """[B, C, H, W] -> [r * r * B, C, H / r, W / r]: sub-grid (a, b) = x[..., a::r, b::r] is batch block a * r + b."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x):
        B, C, H, W = x.shape
        r = self.r
        if H % r or W % r:
            raise _NotDivisible
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # in the [B, H, W, C] memory order, so that the sub-grids come out channels_last too
            y = x.permute(0, 2, 3, 1).reshape(B, H // r, r, W // r, r, C).permute(2, 4, 0, 1, 3, 5)
            return y.reshape(r * r * B, H // r, W // r, C).permute(0, 3, 1, 2)
        return x.reshape(B, C, H // r, r, W // r, r).permute(3, 5, 0, 1, 2, 4).reshape(r * r * B, C, H // r, W // r)


def _batch_to_space(x, r: int):
    n, C, h, w = x.shape
    B = n // (r * r)
    return x.reshape(r, r, B, C, h, w).permute(2, 3, 4, 0, 5, 1).reshape(B, C, h * r, w * r)


class _FusedCifar(nn.Module):
    """The fused :class:`~bagcert.models.CifarBagNet` on normalised input; for a dense model the space-to-batch
    form (``phase``) and the dilated form (``dilated``, used when a map is not a multiple of the dilation)."""

    def __init__(self, model):
        super().__init__()
        self.dilated = nn.Sequential(*self._layers(model, phases=False)[0])
        # group norm's statistics span the whole image: its sub-grids would each get their own, so no phases
        gn = any(isinstance(m, nn.GroupNorm) for m in model.modules())
        phase, splits = self._layers(model, phases=True) if not gn else ([], [])
        self.phase = nn.Sequential(*phase) if splits else None
        self.splits = splits

    @staticmethod
    def _layers(model, phases: bool):
        ops, splits, f = [], [], 1
        mods = list(model.stem)
        i = 0
        while i < len(mods):
            conv = mods[i]
            norm, act = mods[i + 1], isinstance(mods[i + 2], nn.ReLU)
            d = conv.dilation[0]
            geom = {}
            if phases and d > 1:
                if d > f:
                    ops.append(_SpaceToBatch(d // f))
                    splits.append(d // f)
                    f = d
                geom = dict(dilation=1, padding=conv.padding[0] // d)
            ops.append(_ConvNormAct(conv, norm, act, **geom))
            i += 3
        for blk in model.blocks:
            d = blk.conv1.dilation[0]
            if phases and d > 1:
                if d > f:
                    ops.append(_SpaceToBatch(d // f))
                    splits.append(d // f)
                    f = d
                geom = dict(dilation=1, padding=blk.conv1.padding[0] // d)
                crop = blk.crop // d
            else:
                geom, crop = dict(dilation=blk.conv1.dilation, padding=blk.conv1.padding), blk.crop
            ops.append(_CifarBlock(blk, crop, **geom))
        ops.append(_fold(model.head))
        return ops, splits

    def forward(self, x):
        if self.phase is not None:
            try:
                y = self.phase(x)
            except _NotDivisible:
                return self.dilated(x)
            for r in reversed(self.splits):
                y = _batch_to_space(y, r)
            return y
        return self.dilated(x)


class _FusedBottleneck(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.c1 = _ConvNormAct(blk.conv1, blk.bn1, True)
        self.c2 = _ConvNormAct(blk.conv2, blk.bn2, True)
        self.c3 = _ConvNormAct(blk.conv3, blk.bn3, False)
        self.down = None if blk.downsample is None else _ConvNormAct(blk.downsample[0], blk.downsample[1], False)

    def forward(self, x):
        residual = x if self.down is None else self.down(x)
        y = self.c3(self.c2(self.c1(x)))
        if residual.shape[-2:] != y.shape[-2:]:
            residual = residual[:, :, : y.shape[-2], : y.shape[-1]]
        return torch.relu_(y + residual)


class _FusedBagNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.conv1 = copy.deepcopy(model.conv1).requires_grad_(False)
        self.conv2 = _ConvNormAct(model.conv2, model.bn1, True)
        self.layers = nn.Sequential(*[_FusedBottleneck(b) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                                      for b in stage])
        self.fc = _fold(model.fc)

    def forward(self, x):
        return self.fc(self.layers(self.conv2(self.conv1(x))))


class InferenceModel(nn.Module):
    """An eval-only, BN-folded copy of a bagcert model with the same ``local_logits`` contract.

    Attributes as the model's: ``geometry``, ``num_classes``, ``aggregation``, ``config``, ``check_inputs``;
    ``precision`` ("fp32" or "bf16") and ``channels_last`` say how it evaluates. Built by :func:`inference_copy`.
    ``local_logits(x)`` takes float images [B, 3, H, W] in [0, 1] and returns float32 [B, C, h, w] logits (the
    input is checked as :meth:`bagcert.models.BagModel.local_logits` does).
    """

    def __init__(self, model, net: nn.Module, precision: str, channels_last: bool):
        super().__init__()
        self.net = net
        self.geometry = model.geometry
        self.num_classes = model.num_classes
        self.aggregation = model.aggregation
        self.config = getattr(model, "config", {})
        self.check_inputs = getattr(model, "check_inputs", True)
        self.precision = precision
        self.channels_last = channels_last
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())
        self.eval()

    @torch.no_grad()
    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        from .models.base import check_images

        if self.check_inputs:
            check_images(x, self.geometry.min_input_size())
        if x.dtype != self.mean.dtype:
            x = x.to(self.mean.dtype)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                z = self.net(x)
            z = z.float()
        else:
            z = self.net(x)
        return z.contiguous()

    forward = local_logits


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    ts = list(model.parameters()) + list(model.buffers())
    return (tuple((t.data_ptr(), t._version, t.device.type, t.dtype) for t in ts), getattr(model, "aggregation", None))


def supports_fusion(model) -> bool:
    """True for the registry's bagcert models (:class:`~bagcert.models.CifarBagNet`, :class:`~bagcert.models.BagNet`)
    with float32 weights, unchanged since construction (no submodule replaced or reconfigured, the geometry their
    constructor derived); others are evaluated through their own ``local_logits``, so the computation certified is
    always the one whose geometry :func:`bagcert.geometry_inference.verify_geometry` checked."""
    from .geometry_inference import _trusted
    from .models import BagNet, CifarBagNet

    if type(model) not in (CifarBagNet, BagNet) or not _trusted(model):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.dtype == torch.float32


def inference_copy(model, precision: str = "fp32") -> nn.Module:
    """The model evaluated for certification: an :class:`InferenceModel` (BN folded, dense models in
    space-to-batch form, channels_last on the CPU) for a registry model, else the model itself.

    Cached per model and precision while the model's weights are unchanged (any in-place update, e.g. an
    optimiser step or ``load_state_dict``, rebuilds it). Args: ``model`` in eval mode; ``precision`` "fp32" or
    "bf16". Raises ``RuntimeError`` for a model in training mode, ``ValueError`` for an unknown precision.
    """
    check_precision(precision)
    if getattr(model, "training", False):
        raise RuntimeError("model is in training mode; call model.eval() before certifying")
    if isinstance(model, InferenceModel) or not supports_fusion(model):
        return model
    key = (precision, _fingerprint(model))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        hit[1].check_inputs = getattr(model, "check_inputs", True)
        return hit[1]
    from .models import CifarBagNet

    with torch.no_grad():
        net = _FusedCifar(model) if isinstance(model, CifarBagNet) else _FusedBagNet(model)
    dev = next(model.parameters()).device
    cl = dev.type == "cpu"
    if cl:
        net = net.to(memory_format=torch.channels_last)
    fused = InferenceModel(model, net, precision, cl).to(dev)
    fused.check_inputs = getattr(model, "check_inputs", True)
    _CACHE[model] = (key, fused)
    return fused


def chunk_size(model, image_size) -> int:
    """Images per forward pass of the fixed chunk shape for ``model`` at ``image_size`` (H, W): as many as
    keep one float32 activation map of the widest layer under ``CHUNK_BYTES`` (32 MiB) times four live maps,
    at most ``MAX_CHUNK`` (32), at least 1. A function of the model and the image size only, never of the
    batch the caller passes, so every image's logits are computed at the same batch shape."""
    H, W = image_size
    mods = model.modules() if isinstance(model, nn.Module) else ()
    width = max((m.out_channels for m in mods if isinstance(m, nn.Conv2d)), default=64)
    stride = getattr(getattr(model, "geometry", None), "stride", None) or (1, 1)
    locations = max(1, (H * W) // max(1, stride[0] * stride[1]))
    # the widest map at the input resolution bounds every layer's (the stem runs at full resolution)
    per_image = 4 * 4 * max(width * locations, 64 * H * W)
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // per_image)))


@torch.no_grad()
def evaluate_local_logits(model, images: torch.Tensor, *, precision: str = "fp32", chunk: int | None = None) -> torch.Tensor:
    """Local logits [N, C, h, w] (float32) of ``images`` [N, 3, H, W] computed in fixed chunks of ``chunk``
    images (default :func:`chunk_size`), the last one filled up with copies of its last image: each image's
    logits are the same bits whatever N, and whatever images share its chunk.

    ``model`` is evaluated through :func:`inference_copy` (pass the :class:`InferenceModel` to skip the cache
    lookup). Raises what the model's ``local_logits`` raises for invalid images.
    """
    fast = inference_copy(model, precision)
    if chunk is None:
        chunk = chunk_size(model, tuple(images.shape[-2:]))
    if precision == "bf16" and fast is model:
        run = lambda x: _autocast_logits(model, x)  # noqa: E731
    else:
        run = fast.local_logits
    N = images.shape[0]
    out = None
    for s in range(0, N, chunk):
        x = images[s : s + chunk]
        n = x.shape[0]
        if n < chunk:
            x = torch.cat([x, x[-1:].expand(chunk - n, *x.shape[1:])])
        z = run(x)[:n]
        if out is None:
            out = torch.empty((N,) + tuple(z.shape[1:]), dtype=torch.float32, device=z.device)
        out[s : s + n] = z
    return out


def _autocast_logits(model, x):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        z = model.local_logits(x)
    return z.float()


# memory for the certificate's tensors of one batch of :func:`bagcert.certify` with ``batch_size=None``
CERTIFY_BYTES = 512 * 2**20


def certify_batch_size(model, image_size, chunk: int) -> int:
    """Images per certificate batch of :func:`bagcert.certify` when the caller gives no ``batch_size``: a multiple
    of ``chunk`` whose integral images and window sums (about 64 bytes per class and location) fit
    ``CERTIFY_BYTES`` (512 MiB), at least one chunk. The results do not depend on it."""
    g = getattr(model, "geometry", None)
    h, w = g.grid_size(*image_size) if getattr(g, "layers", None) else image_size
    per_image = 64 * int(getattr(model, "num_classes", 10)) * (h + 1) * (w + 1)
    return max(1, CERTIFY_BYTES // (per_image * chunk)) * chunk
