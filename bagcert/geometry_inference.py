"""Infer a model's receptive-field geometry from its computation, and check a declared one against it.

A certificate is only as sound as the geometry it uses: a location whose true window is wider than the
declared one can be changed by a patch the certificate thinks it cannot reach. This module establishes
the true geometry from the computation itself instead of trusting a declaration.

Method (:func:`infer_geometry`). The module's local-logit function is traced with ``torch.fx``
(``make_fx`` on fake tensors of the given image size, functionalised, down to ATen operations). Shape-
dependent Python control flow is followed at that size; control flow that depends on pixel values
cannot be traced and is refused. The trace is taken with a batch of two images and with a batch of one, and
both must give the same dependency (Python code that branches on the batch size is refused). Then, for every
tensor of the graph and each image axis, the analysis carries the interval of input pixels ``[lo[i], hi[i]]`` that location ``i`` can depend on, whatever the
weights and the input values (a superset: a window's interval is the hull of its inputs' intervals):

* convolutions and max/avg pooling (any kernel, stride, padding, dilation, ceil mode; rectangular),
* zero, constant, reflect and replicate padding (``F.pad``, ``padding_mode=``), negative padding (crops),
* slicing and splitting (crops and strided subsampling), pointwise operations with broadcasting
  (activations, residual sums: the union of the branches), BatchNorm in eval mode, concatenation, chunks
  and ``glu`` along channels, reductions over channels (softmax over classes), permutes, and reshapes that
  keep each image axis whole (it may share a dimension with the batch: ``[B*H*W, C]`` for a per-location
  ``Linear`` / ``LayerNorm`` in channels-last layout, ``[B*W, C, H]`` for a ``conv1d`` along the rows),
* windows: a reshape that cuts an image axis into blocks (outer dim: the window, inner dims: the position in
  it) keeps the axis on the outer dim with each block's hull; attention (scaled dot product, batched matrix
  products) is followed when the tokens it mixes carry no image axis (attention inside windows).

Everything else that touches a tensor derived from the image is refused with the reason, among them:
global or adaptive pooling and means over the image axes, flatten + linear, attention over tokens that are
image locations (unwindowed), BatchNorm in
training mode (batch statistics), group/instance/layer norm over the image, interpolation and
upsampling, transposed convolutions, circular padding (a border location sees the opposite border),
concatenation along an image axis, gathers and in-place writes into slices, and values read out of torch
(``Tensor.numpy``, ``np.asarray``, ``Tensor.tolist``: they come back as constants, hiding the dependency).

From the intervals of the output map, with the stride ``S`` of the traced chain, the geometry is the
tightest box ``[i*S - P, i*S - P + r - 1]`` containing every location's interval: ``P = max_i(i*S - lo[i])``
and ``r = max_i(hi[i] - i*S) + P + 1``. It is exact for convolution stacks (an interior location's
interval is the nominal window; border intervals are clipped by the image).

Cross-check. :func:`infer_geometry` then runs the real module (its own weights, eval mode) on random
images and takes the input gradient of a few locations (corners and centre): every pixel with a nonzero
gradient must lie inside the inferred box, and the real output grid must be the traced one. A failure
is reported as a bug, never silently accepted.

Checking a declaration (:func:`verify_geometry`). A declared geometry covers the true one when the grid
sizes agree and, for every location, its pixel box (clipped to the image) contains the true interval.
A covering but larger declaration is sound (certificates are more conservative) and allowed with a
warning; anything else is refused with both geometries named. The result is cached per model (weakly)
and image size; see :func:`verify_geometry` for what invalidates the cache.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

from .geometry import Geometry, normalize_image_size

__all__ = ["GeometryError", "GeometryWarning", "infer_geometry", "verify_geometry", "geometry_report"]

_BIG = 1 << 40  # "no dependency": lo = +BIG, hi = -BIG


class GeometryError(ValueError):
    """A geometry cannot be established for a module, or a declared geometry does not cover the true one."""


class GeometryWarning(UserWarning):
    """A declared geometry is larger than the true one: sound, but the certificates are more conservative."""


# ------------------------------------------------------------------------------------------------------------------
# dependency intervals
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _Axis:
    """Per-location input-pixel intervals along one image axis: lo, hi long [n]; stride in pixels (None: unknown)."""

    lo: torch.Tensor
    hi: torch.Tensor
    stride: int | None

    @property
    def n(self) -> int:
        return int(self.lo.numel())


@dataclass
class _Dep:
    """Dependency of a tensor on the image. ``labels[d]`` lists the axes dimension ``d`` holds, as components
    ``(axis, inner, size)`` with axis 'H', 'W' or 'B' (the batch), ``inner`` the step of the axis inside the
    dimension (1 unless the dimension merges several, e.g. [B*H*W, C]) and ``size`` its length; ``()`` for a
    dimension holding none (channels). ``axes`` holds the pixel intervals of 'H' and 'W'."""

    labels: tuple
    axes: dict  # 'H' / 'W' -> _Axis


_AXIS_NAME = {"H": "image rows (height)", "W": "image columns (width)", "B": "batch"}


_OPAQUE = object()  # an output derived from the image that the analysis does not follow: any use is refused


class _Refuse(Exception):
    pass


def _refuse(op: str, why: str):
    raise _Refuse(f"{op}: {why}")


def _op_name(target) -> str:
    try:
        return f"aten.{target.overloadpacket.__name__}"
    except AttributeError:
        return getattr(target, "__name__", str(target))


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(int(v) for v in val.shape) if isinstance(val, torch.Tensor) else None


def _window(ax: _Axis, n_out: int, k: int, s: int, p: int, d: int) -> _Axis:
    """Location o reads positions ``o*s - p + d*m`` (m < k) of a grid of ``ax.n``; positions off the grid
    (zero / -inf padding) read nothing."""
    n_in = ax.n
    pos = torch.arange(n_out)[:, None] * s - p + d * torch.arange(k)[None, :]
    valid = (pos >= 0) & (pos < n_in)
    posc = pos.clamp(0, max(n_in - 1, 0))
    lo = torch.where(valid, ax.lo[posc], _BIG).amin(dim=1)
    hi = torch.where(valid, ax.hi[posc], -_BIG).amax(dim=1)
    return _Axis(lo, hi, None if ax.stride is None else ax.stride * s)


def _remap(ax: _Axis, src: torch.Tensor) -> _Axis:
    """New location o copies location ``src[o]`` (-1: a constant, no dependency)."""
    valid = src >= 0
    srcc = src.clamp(min=0)
    lo = torch.where(valid, ax.lo[srcc], _BIG)
    hi = torch.where(valid, ax.hi[srcc], -_BIG)
    return _Axis(lo, hi, ax.stride)


def _union_axes(axes: list, n: int, op: str, name: str) -> _Axis:
    """Hull per location of several operands' intervals; operands of length 1 are broadcast."""
    lo = torch.full((n,), _BIG, dtype=torch.long)
    hi = torch.full((n,), -_BIG, dtype=torch.long)
    strides = set()
    for ax in axes:
        if ax.n == n:
            lo, hi = torch.minimum(lo, ax.lo), torch.maximum(hi, ax.hi)
            if ax.stride is not None:
                strides.add(ax.stride)
        elif ax.n == 1:  # broadcast: the one location's interval holds for all
            lo, hi = torch.minimum(lo, ax.lo.expand(n)), torch.maximum(hi, ax.hi.expand(n))
        else:
            _refuse(op, f"operands of different sizes along the {_AXIS_NAME[name]} ({ax.n} vs {n})")
    if len(strides) > 1 and n > 1:
        _refuse(op, f"merges branches with different strides {sorted(strides)} along the {_AXIS_NAME[name]}")
    stride = min(strides) if strides else None
    return _Axis(lo, hi, stride)


def _input_dep(B: int, H: int, W: int) -> _Dep:
    return _Dep(((("B", 1, B),), (), (("H", 1, H),), (("W", 1, W),)),
                {"H": _Axis(torch.arange(H), torch.arange(H), 1), "W": _Axis(torch.arange(W), torch.arange(W), 1)})


# ------------------------------------------------------------------------------------------------------------------
# the operations
# ------------------------------------------------------------------------------------------------------------------
_IDENTITY = {"clone", "alias", "detach", "lift_fresh_copy", "contiguous", "_to_copy", "to", "dropout",
             "feature_dropout", "alpha_dropout", "_native_batch_norm_legit_no_training", "view_as", "type_as",
             "_assert_tensor_metadata", "lift_fresh"}
_CONSTRUCTORS = {"empty", "zeros", "ones", "full", "arange", "scalar_tensor", "rand", "randn", "empty_like",
                 "zeros_like", "ones_like", "full_like", "empty_strided", "new_zeros", "new_ones", "new_full",
                 "new_empty", "tensor"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
               "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "any", "all", "_softmax", "_log_softmax",
               "softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "count_nonzero", "nansum", "median",
               "mode", "sort", "topk", "kthvalue", "cummax", "cummin", "glu"}
_KEEPS_REDUCED_DIM = {"_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp",
                      "sort", "cummax", "cummin"}
_GLOBAL_WHY = {
    "mean": "global average pooling",
    "sum": "a sum over the image",
    "amax": "global max pooling",
    "max": "global max pooling",
}
_REFUSED = {
    "_adaptive_avg_pool2d": "adaptive average pooling: its windows depend on the image size (global pooling when "
                            "the output is 1x1)",
    "adaptive_max_pool2d": "adaptive max pooling: its windows depend on the image size (global pooling when the "
                           "output is 1x1)",
    "_adaptive_avg_pool3d": "adaptive pooling",
    "native_group_norm": "GroupNorm / InstanceNorm normalise with statistics over the whole image, so every "
                         "location depends on every pixel",
    "_native_batch_norm_legit": "BatchNorm in training mode normalises with batch statistics over every image and "
                                "location: call model.eval()",
    "_native_batch_norm_legit_functional": "BatchNorm in training mode normalises with batch statistics over every "
                                           "image and location: call model.eval()",
    "upsample_nearest2d": "interpolation / upsampling: the box geometry of a location cannot be bounded",
    "upsample_bilinear2d": "interpolation / upsampling: the box geometry of a location cannot be bounded",
    "upsample_bicubic2d": "interpolation / upsampling: the box geometry of a location cannot be bounded",
    "_upsample_nearest_exact2d": "interpolation / upsampling: the box geometry of a location cannot be bounded",
    "_upsample_bilinear2d_aa": "interpolation / upsampling: the box geometry of a location cannot be bounded",
    "grid_sampler_2d": "grid sampling reads data-dependent positions",
    "_pad_circular": "circular padding wraps around: a border location sees the opposite border, so no box "
                     "describes its window",
    "roll": "roll wraps around: a border location sees the opposite border",
    "flip": "flipping an image axis reverses the location order",
    "im2col": "unfold (im2col) moves image positions into channels",
    "col2im": "fold (col2im) moves channels into image positions",
    "copy_": "an in-place write into a slice of a tensor (circular padding is built this way: a border location "
             "sees the opposite border)",
    "slice_scatter": "a write into a slice of a tensor (circular padding is built this way)",
    "index_put": "an indexed write",
    "index": "indexing with tensors along an image axis",
    "index_select": "index_select along an image axis",
    "gather": "gather reads data-dependent positions",
    "scatter": "scatter writes data-dependent positions",
    "_unsafe_index": "indexing with tensors (e.g. nearest interpolation)",
}


def _comps_axes(comps) -> list:
    """The image axes ('H' / 'W') among a dimension's components."""
    return [c[0] for c in comps if c[0] in ("H", "W")]


def _plain(comps, n: int):
    """The label of a dimension that is exactly one whole axis (``(('H', 1, n),)``), else None."""
    return comps[0][0] if len(comps) == 1 and comps[0][1] == 1 and comps[0][2] == n else None


def _pointwise(node, deps, out_shape, op):
    """Pointwise operation with broadcasting: per location, the hull of the operands' intervals."""
    nd = len(out_shape)
    labels: list = [None] * nd
    per_axis: dict = {}
    for a, dep in deps:
        shp = _shape(a)
        off = nd - len(dep.labels)
        for d, comps in enumerate(dep.labels):
            if not comps:
                continue
            k = d + off
            if shp is not None and shp[d] != out_shape[k]:  # a broadcast size-1 dim
                continue
            if labels[k] is not None and labels[k] != comps:
                _refuse(op, "combines operands whose image axes lie in different places (e.g. rows of one with "
                            "columns of another)")
            labels[k] = comps
        for lab in ("H", "W"):
            per_axis.setdefault(lab, []).append(dep.axes[lab])
    labels = [comps or () for comps in labels]
    axes = {}
    for lab in ("H", "W"):
        sizes = [c[2] for comps in labels for c in comps if c[0] == lab]
        if len(sizes) != 1:
            _refuse(op, f"the {_AXIS_NAME[lab]} are broadcast or lost")
        axes[lab] = _union_axes(per_axis[lab], sizes[0], op, lab)
    return _Dep(tuple(labels), axes)


def _suffix(shape) -> list:
    out, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        out[d] = acc
        acc *= shape[d]
    return out


def _view(dep: _Dep, in_shape, out_shape, op):
    """A reshape: each axis is followed by its position in the row-major order, which a view keeps. An axis may
    share a dimension with others (the batch, e.g. [B*H*W, C] for a per-location linear layer) but not be split."""
    sin, sout = _suffix(in_shape), _suffix(out_shape)
    labels: list = [[] for _ in out_shape]
    axes_out: dict = {}
    for d, comps in enumerate(dep.labels):
        for lab, inner, size in comps:
            flat = sin[d] * inner
            home = [e for e in range(len(out_shape))
                    if flat % sout[e] == 0 and sout[e] <= flat and flat * size <= sout[e] * out_shape[e]
                    and (out_shape[e] > 1 or size == 1)]
            split = [e for e in range(len(out_shape)) if sout[e] * out_shape[e] == flat * size and sout[e] > flat
                     and size % out_shape[e] == 0 and (flat * size // sout[e]) == out_shape[e]] if not home else []
            if not home and split and lab in ("H", "W") and any(sout[f] == flat for f in range(split[0], len(out_shape))):
                # windows: the axis is cut into blocks (outer dim: which window, inner dims: the position inside it);
                # the outer dim keeps the axis with each block's hull, the inner positions are free to mix
                e = split[0]
                n_blocks, block = out_shape[e], size // out_shape[e]
                ax = axes_out.get(lab, dep.axes[lab])
                if ax.n != size:
                    _refuse(op, f"the reshape cuts the {_AXIS_NAME[lab]} in a way the analysis does not follow")
                axes_out[lab] = _Axis(ax.lo.view(n_blocks, block).amin(1), ax.hi.view(n_blocks, block).amax(1),
                                      None if ax.stride is None else ax.stride * block)
                labels[e].append((lab, 1, n_blocks))
                continue
            if not home:
                if lab == "B":
                    continue  # the batch split up: only its label is lost
                _refuse(op, f"the reshape splits the {_AXIS_NAME[lab]} or merges them with channels (e.g. flatten + "
                            "linear, or tokens for attention): an output would mix locations")
            e = home[0]
            labels[e].append((lab, flat // sout[e], size))
        # (an axis split over several dims: windows) is handled below
    for e, comps in enumerate(labels):
        comps.sort(key=lambda c: -c[1])  # row-major: outer components first
        inner_of = 1
        for lab, inner, size in reversed(comps):
            if inner < inner_of and lab in ("H", "W"):
                _refuse(op, "the reshape interleaves an image axis with other data")
            inner_of = inner * size
    return _Dep(tuple(tuple(c) for c in labels), {**dep.axes, **axes_out})


def _attention(deps_in: list, op: str, n_out):
    """Products over the last two dims of tensors that all depend on the image (attention scores and their use):
    sound when the image axes sit only in the leading (batch) dims, identical in every operand (windowed
    attention: each window its own sequence); the tokens and channels they mix are free of image axes."""
    ref = deps_in[0]
    for d in deps_in:
        if len(d.labels) != len(ref.labels) or d.labels[:-2] != ref.labels[:-2]:
            _refuse(op, "attention between tensors whose batch or window dimensions differ")
        if _comps_axes(d.labels[-1]) or _comps_axes(d.labels[-2]):
            _refuse(op, "attention over tokens that are image locations (unwindowed attention) mixes every location "
                        "with every other")
    labels = tuple(ref.labels[:-2]) + ((), ())
    axes = {lab: _union_axes([d.axes[lab] for d in deps_in], ref.axes[lab].n, op, lab) for lab in ("H", "W")}
    res = _Dep(labels, axes)
    # the other outputs (log-sum-exp, seeds...) are not followed: a use of them is refused
    return res if n_out is None else (res,) + (_OPAQUE,) * (n_out - 1)


def _reduce_dims(args, op_short, ndim, kwargs=None):
    kwargs = kwargs or {}
    """The dims a reduction reduces (None: all)."""
    if op_short in ("_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp",
                    "cummax", "cummin"):
        dims = args[1]
    elif op_short in ("topk", "kthvalue"):  # (self, k, dim=-1, ...): args[1] is k, not a dim
        dims = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    elif op_short in ("sort", "mode") and len(args) == 1 and "dim" not in kwargs:  # (self, dim=-1, ...)
        dims = -1
    elif len(args) > 1 and isinstance(args[1], (int, list, tuple)) and not isinstance(args[1], bool):
        dims = args[1]
    elif op_short in ("norm", "linalg_vector_norm") and len(args) > 2:
        dims = args[2]
    else:
        dims = None
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims]


def _analyse(gm, H: int, W: int):
    """Walk the ATen graph of the local-logit function; return the output's ``_Dep`` and shape."""
    env: dict = {}
    out_node = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = _input_dep(_shape(node)[0], H, W)
            continue
        if node.op == "get_attr":
            env[node] = None
            continue
        if node.op == "output":
            out_node = node
            continue
        if node.op != "call_function":
            _refuse(str(node.target), f"unsupported graph node kind {node.op!r}")
        env[node] = _handle(node, env)
    flat = []
    torch.fx.node.map_arg(out_node.args[0], flat.append)
    tensors = [a for a in flat if isinstance(_shape(a), tuple)]
    if len(tensors) != 1:
        raise _Refuse(f"the local-logit function returns {len(tensors)} tensors; expected one map [B, C, h, w]")
    if env[tensors[0]] is _OPAQUE:
        raise _Refuse("the local-logit function returns an auxiliary output the analysis does not follow")
    return env[tensors[0]], _shape(tensors[0])


def _spatial_op(dep: _Dep, in_shape, out_shape, nsp: int, op: str, what: str, per_axis):
    """Shared by convolution and pooling: the last ``nsp`` dims are windowed, the channel dim (just before them,
    when there is one) is mixed, the leading (batch) dims are independent items."""
    nd = len(in_shape)
    labels = list(dep.labels)
    axes = dict(dep.axes)
    if nd > nsp + 1 and _comps_axes(labels[nd - nsp - 1]) and what == "convolution":
        _refuse(op, "a convolution that mixes the channel dimension, which holds an image axis")
    for k in range(nsp):
        d = nd - nsp + k
        comps = labels[d]
        if not comps:
            continue
        lab = _plain(comps, in_shape[d])
        if lab not in ("H", "W"):
            if _comps_axes(comps):
                _refuse(op, f"{what} along a dimension that mixes an image axis with other data")
            labels[d] = ()  # the batch windowed as if it were space: its label is dropped
            continue
        axes[lab] = per_axis(k, dep.axes[lab], out_shape[d])
        labels[d] = ((lab, 1, out_shape[d]),)
    if what == "convolution" and nd > nsp + 1:
        labels[nd - nsp - 1] = ()
    return _Dep(tuple(labels), axes)


def _handle(node, env):
    target = node.target
    op = _op_name(target)
    short = op[len("aten."):] if op.startswith("aten.") else op
    args = list(node.args)
    kwargs = dict(node.kwargs)

    def dep_of(a):
        return env.get(a) if isinstance(a, torch.fx.Node) else None

    flat: list = []
    torch.fx.node.map_arg((args, kwargs), flat.append)
    deps = [(a, env.get(a)) for a in flat if isinstance(env.get(a), _Dep)]
    if getattr(target, "__name__", "") == "getitem":  # one output of a multi-output op
        src = env.get(args[0])
        return src[args[1]] if isinstance(src, tuple) else None
    if any(env.get(a) is _OPAQUE for a in flat):
        _refuse(op, "uses an auxiliary output of an operation (e.g. the statistics of a normalisation) that the "
                    "analysis does not follow")
    if not deps:
        if any(isinstance(env.get(a), tuple) and any(isinstance(e, _Dep) for e in env.get(a)) for a in flat):
            _refuse(op, "unexpected use of a multi-output operation")
        return None  # constants (weights, buffers, shapes) do not depend on the image
    out_shape = _shape(node)
    if short in _REFUSED:
        _refuse(op, _REFUSED[short])
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        _refuse(op, "an in-place write into a tensor derived from the image (the analysis follows values, not "
                    "memory)")
    if short == "convolution":
        x, w = args[0], args[1]
        stride, padding, dilation, transposed = args[3], args[4], args[5], args[6]
        if transposed:
            _refuse(op, "transposed convolution (upsampling) spreads one location over several")
        if dep_of(w) is not None or (len(args) > 2 and dep_of(args[2]) is not None):
            _refuse(op, "convolution weights computed from the image (dynamic filters)")
        dep = dep_of(x)
        wshape = _shape(w)
        nsp = len(wshape) - 2
        stride, padding, dilation = ([int(v) for v in (list(a) * nsp if len(a) == 1 else a)]
                                     for a in (stride, padding, dilation))
        return _spatial_op(dep, _shape(x), out_shape, nsp, op, "convolution",
                           lambda k, ax, n: _window(ax, n, wshape[2 + k], stride[k], padding[k], dilation[k]))
    if short in ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d",
                 "max_pool1d_with_indices", "avg_pool3d", "max_pool3d_with_indices"):
        dep = dep_of(args[0])
        nsp = 3 if "3d" in short else 2 if "2d" in short else 1

        def get(i, default):
            v = args[i] if len(args) > i else default
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            return v * nsp if len(v) == 1 else v

        kernel = get(1, None)
        stride = get(2, [])
        stride = stride if stride and len(stride) == nsp and stride[0] is not None else kernel
        padding = get(3, 0)
        dilation = get(4, 1) if "max" in short else [1] * nsp
        shp = out_shape if out_shape is not None else _shape_of_tuple(node)
        res = _spatial_op(dep, _shape(args[0]), shp, nsp, op, "pooling",
                          lambda k, ax, n: _window(ax, n, kernel[k], stride[k], padding[k], dilation[k]))
        # the indices (argmax positions) depend on the same window as the values
        return (res, res) if short.endswith("with_indices") else res
    if short in ("native_batch_norm", "batch_norm", "_batch_norm_impl_index", "cudnn_batch_norm",
                 "miopen_batch_norm"):
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if training:
            _refuse(op, "BatchNorm in training mode normalises with batch statistics over every image and location: "
                        "call model.eval()")
        dep = dep_of(args[0])
        if _comps_axes(dep.labels[1]):
            _refuse(op, "batch norm over a channel dimension that holds an image axis")
        return (dep, None, None) if short in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm") else dep
    if short == "_native_batch_norm_legit_no_training":
        return (dep_of(args[0]), None, None)
    if short == "native_dropout":
        return (dep_of(args[0]), None)
    if short == "native_layer_norm":
        dep = dep_of(args[0])
        k = len(args[1])
        if any(_comps_axes(c) for c in dep.labels[len(dep.labels) - k:]):
            _refuse(op, "LayerNorm over an image axis normalises with statistics over the whole image")
        if any(dep_of(a) is not None for a in args[2:4]):
            _refuse(op, "LayerNorm with weights computed from the image")
        # mean and rstd (statistics of the input) are not followed: a use of them is refused
        return (dep, _OPAQUE, _OPAQUE)
    if short in ("constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
                 "replication_pad2d", "pad"):
        dep = dep_of(args[0])
        pads = list(args[1])
        mode = "constant"
        if short.startswith("reflection"):
            mode = "reflect"
        elif short.startswith("replication"):
            mode = "replicate"
        elif short == "pad":
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if mode == "circular":
            _refuse(op, _REFUSED["_pad_circular"])
        in_shape = _shape(args[0])
        nd = len(in_shape)
        labels = list(dep.labels)
        axes = dict(dep.axes)
        for j in range(len(pads) // 2):
            d = nd - 1 - j
            before, after = pads[2 * j], pads[2 * j + 1]
            if not (before or after) or not labels[d]:
                continue
            lab = _plain(labels[d], in_shape[d])
            if lab not in ("H", "W"):
                if _comps_axes(labels[d]):
                    _refuse(op, "padding along a dimension that mixes an image axis with other data")
                labels[d] = ()
                continue
            n = in_shape[d]
            src = torch.arange(-before, n + after)
            if mode == "constant":
                src = torch.where((src >= 0) & (src < n), src, torch.full_like(src, -1))
            elif mode == "reflect":
                src = src.abs()
                src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
                if bool(((src < 0) | (src > n - 1)).any()):
                    _refuse(op, "reflect padding wider than the tensor")
            elif mode == "replicate":
                src = src.clamp(0, n - 1)
            else:
                _refuse(op, f"padding mode {mode!r}")
            axes[lab] = _remap(dep.axes[lab], src)
            labels[d] = ((lab, 1, int(src.numel())),)
        return _Dep(tuple(labels), axes)
    if short in ("slice", "narrow"):
        dep = dep_of(args[0])
        in_shape = _shape(args[0])
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(in_shape)
        n = in_shape[dim]
        if short == "narrow":
            start, length = args[2], args[3]
            idx = torch.arange(n)[start % n if start < 0 else start:][:length]
            step = 1
        else:
            start = args[2] if len(args) > 2 else kwargs.get("start", None)
            end = args[3] if len(args) > 3 else kwargs.get("end", None)
            step = args[4] if len(args) > 4 else kwargs.get("step", 1)
            idx = torch.tensor(list(range(n)[slice(start, end, step)]), dtype=torch.long)
        comps = dep.labels[dim]
        if not comps or (idx.numel() == n and bool((idx == torch.arange(n)).all())):
            return dep
        labels = list(dep.labels)
        axes = dict(dep.axes)
        lab = _plain(comps, n)
        if lab in ("H", "W"):
            ax = dep.axes[lab]
            axes[lab] = _Axis(ax.lo[idx], ax.hi[idx], None if ax.stride is None else ax.stride * step)
            labels[dim] = ((lab, 1, int(idx.numel())),)
        elif _comps_axes(comps):
            _refuse(op, "slicing a dimension that mixes an image axis with other data")
        else:
            labels[dim] = ()
        return _Dep(tuple(labels), axes)
    if short in ("select", "squeeze", "unsqueeze", "permute", "transpose", "t", "expand", "view", "_unsafe_view",
                 "reshape", "flatten", "unflatten", "squeeze_copy", "view_copy", "permute_copy", "expand_copy",
                 "unsqueeze_copy", "transpose_copy", "numpy_T", "movedim", "_reshape_alias", "view_as"):
        dep = dep_of(args[0])
        in_shape = _shape(args[0])
        nd = len(in_shape)
        if short == "select":
            dim = args[1] % nd
            if _comps_axes(dep.labels[dim]):
                _refuse(op, "selects one position of a dimension that holds an image axis")
            return _Dep(dep.labels[:dim] + dep.labels[dim + 1:], dep.axes)
        if short in ("permute", "permute_copy"):
            perm = [p % nd for p in args[1]]
            return _Dep(tuple(dep.labels[p] for p in perm), dep.axes)
        if short in ("transpose", "transpose_copy", "t", "numpy_T"):
            a, b = (args[1] % nd, args[2] % nd) if len(args) > 2 else (0, 1)
            labels = list(dep.labels)
            labels[a], labels[b] = labels[b], labels[a]
            return _Dep(tuple(labels), dep.axes)
        if short in ("expand", "expand_copy"):
            labels = [()] * (len(out_shape) - nd) + list(dep.labels)
            for d in range(len(out_shape) - nd, len(out_shape)):
                if out_shape[d] != in_shape[d - (len(out_shape) - nd)] and labels[d]:
                    if _comps_axes(labels[d]):
                        _refuse(op, "broadcasts an image axis")
                    labels[d] = ()
            return _Dep(tuple(labels), dep.axes)
        return _view(dep, in_shape, out_shape, op)
    if short in ("split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unsafe_split"):
        dep = dep_of(args[0])
        in_shape = _shape(args[0])
        nd = len(in_shape)
        vals = node.meta.get("val")
        if not isinstance(vals, (list, tuple)):
            _refuse(op, "unknown output shapes")
        default = 0
        dim = args[2] if short != "unbind" and len(args) > 2 else (args[1] if short == "unbind" and len(args) > 1 else
                                                                     kwargs.get("dim", default))
        dim %= nd
        comps = dep.labels[dim]
        outs, start = [], 0
        for v in vals:
            size = int(v.shape[dim]) if short != "unbind" else 1
            labels = list(dep.labels)
            axes = dict(dep.axes)
            lab = _plain(comps, in_shape[dim]) if comps else None
            if lab in ("H", "W"):
                if short == "unbind":
                    _refuse(op, f"unbinds the {_AXIS_NAME[lab]}")
                ax = dep.axes[lab]
                axes[lab] = _Axis(ax.lo[start:start + size], ax.hi[start:start + size], ax.stride)
                labels[dim] = ((lab, 1, size),)
            elif _comps_axes(comps):
                _refuse(op, "splits a dimension that mixes an image axis with other data")
            elif short == "unbind":
                del labels[dim]
            else:
                labels[dim] = ()
            outs.append(_Dep(tuple(labels), axes))
            start += size
        return tuple(outs)
    if short in ("cat", "stack"):
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        parts = [(t, env.get(t)) for t in tensors if isinstance(env.get(t), _Dep)]
        ref = parts[0][1]
        nd_in = len(ref.labels)
        dim = dim % (nd_in + (1 if short == "stack" else 0))
        if short == "cat" and _comps_axes(ref.labels[dim]):
            _refuse(op, "concatenation along an image axis (circular padding is built this way: a border location "
                        "sees the opposite border)")
        for _, d in parts:
            if [c for i, c in enumerate(d.labels) if i != dim or short == "stack"] != \
                    [c for i, c in enumerate(ref.labels) if i != dim or short == "stack"]:
                _refuse(op, "concatenates tensors whose image axes lie in different dimensions")
        labels = list(ref.labels)
        if short == "stack":
            labels.insert(dim, ())
        else:
            labels[dim] = ()
        axes = {lab: _union_axes([d.axes[lab] for _, d in parts], ref.axes[lab].n, op, lab) for lab in ("H", "W")}
        return _Dep(tuple(labels), axes)
    if short in _REDUCTIONS:
        dep = dep_of(args[0])
        if dep is None:
            _refuse(op, "a reduction whose extra operands depend on the image")
        nd = len(dep.labels)
        dims = _reduce_dims(args, short, nd, kwargs)
        for d in dims:
            ax = _comps_axes(dep.labels[d])
            if ax:
                why = _GLOBAL_WHY.get(short, "a reduction over the image")
                _refuse(op, f"{why}: every output depends on all {_AXIS_NAME[ax[0]]}, i.e. on the whole image")
        if short in _KEEPS_REDUCED_DIM:
            res = _Dep(dep.labels, dep.axes)
        else:
            first = out_shape if out_shape is not None else _shape_of_tuple(node)  # (values, indices): values
            keep = len(first) == nd
            if keep:
                labels = tuple(() if d in dims else c for d, c in enumerate(dep.labels))
            else:
                labels = tuple(c for d, c in enumerate(dep.labels) if d not in dims)
            res = _Dep(labels, dep.axes)
        if out_shape is None:  # multi-output (values, indices): the indices depend on the same pixels as the values
            return (res, res)
        return res
    if short in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_attention_math", "_scaled_dot_product_cudnn_attention"):
        qkv = [dep_of(a) for a in args[:3] if dep_of(a) is not None]
        if any(dep_of(a) is not None for a in args[3:]) or any(dep_of(v) is not None for v in kwargs.values()):
            _refuse(op, "an attention mask computed from the image")
        val = node.meta.get("val")
        return _attention(qkv, op, len(val) if isinstance(val, (tuple, list)) else None)
    if short in ("bmm", "matmul") and dep_of(args[0]) is not None and dep_of(args[1]) is not None:
        return _attention([dep_of(args[0]), dep_of(args[1])], op, None)
    if short in ("mm", "addmm", "bmm", "baddbmm"):
        # a per-location linear layer: rows of ``a`` are independent items (they may hold the image axes), the
        # contraction runs over channels, the other operand is a constant weight
        a, b = (args[1], args[2]) if short in ("addmm", "baddbmm") else (args[0], args[1])
        bias = args[0] if short in ("addmm", "baddbmm") else None
        da = dep_of(a)
        if da is None or dep_of(b) is not None or (bias is not None and dep_of(bias) is not None):
            _refuse(op, "a matrix product of two tensors computed from the image (attention) mixes locations")
        k = len(da.labels) - 1
        if _comps_axes(da.labels[k]):
            _refuse(op, "a matrix product over image locations (flatten + linear) mixes every location")
        return _Dep(tuple(da.labels[:k]) + ((),), da.axes)
    if short in ("matmul", "linear", "einsum", "addmv", "mv", "dot", "tensordot", "_weight_norm_interface"):
        _refuse(op, "a matrix product over a tensor derived from the image (flatten + linear, or attention) mixes "
                    "locations")
    if short in _IDENTITY:
        dep = dep_of(args[0]) if isinstance(args[0], torch.fx.Node) else deps[0][1]
        return dep
    if short in _CONSTRUCTORS:
        return None
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        if out_shape is None:
            _refuse(op, "a pointwise operation with several outputs")
        return _pointwise(node, deps, out_shape, op)
    _refuse(op, "an operation the geometry analysis does not know, so which pixels it reads cannot be established")


def _shape_of_tuple(node):
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return tuple(int(v) for v in val[0].shape)
    raise _Refuse(f"{_op_name(node.target)}: unknown output shape")


# ------------------------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------------------------
def _logit_function(module):
    """``x -> local logits [B, C, h, w]`` of ``module``: its ``local_logits`` when it has one, else its forward."""
    if hasattr(module, "local_logits") and callable(module.local_logits):
        return module.local_logits
    if callable(module):
        return module
    raise TypeError(f"expected a torch module mapping images [B, 3, H, W] to logits [B, C, h, w], got "
                    f"{type(module).__name__}")


class _InputsUnchecked:
    """Switch off a bagcert model's data-dependent input check while tracing (restored afterwards)."""

    def __init__(self, module):
        self.mods = [m for m in (module.modules() if isinstance(module, torch.nn.Module) else [])
                     if isinstance(getattr(m, "check_inputs", None), bool)]

    def __enter__(self):
        self.saved = [m.check_inputs for m in self.mods]
        for m in self.mods:
            m.check_inputs = False

    def __exit__(self, *exc):
        for m, v in zip(self.mods, self.saved):
            m.check_inputs = v


def _param_like(module):
    if isinstance(module, torch.nn.Module):
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def _describe(module) -> str:
    return getattr(module, "_bagcert_name", None) or type(module).__name__


class _NoValueReads(torch.overrides.TorchFunctionMode):
    """Refuse reading tensor values out of the traced computation (``Tensor.numpy``, ``np.asarray(t)``,
    ``Tensor.tolist``): a value that leaves torch comes back as a constant, so the trace would miss the dependency
    (e.g. a term computed in numpy from the brightest pixel anywhere in the image)."""

    _READS = ("numpy", "__array__", "tolist")

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self._READS:
            raise GeometryError(
                f"cannot establish the geometry of {_describe(self.module)}: its computation reads tensor values out "
                f"of torch (Tensor.{name}), so the dependency of what it computes from them cannot be traced; keep the "
                "local-logit computation in torch operations, or certify with certify_logits under your own "
                "responsibility")
        return func(*args, **(kwargs or {}))


def _trace(module, H: int, W: int, batch: int = 2):
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functionalize

    fn = _logit_function(module)
    # circular padding is refused with its reason before tracing (it lowers to in-place slice writes)
    if isinstance(module, torch.nn.Module):
        for name, m in module.named_modules():
            if getattr(m, "padding_mode", "zeros") == "circular":
                raise GeometryError(
                    f"cannot establish the geometry of {_describe(module)}: submodule {name!r} uses "
                    f"padding_mode='circular': {_REFUSED['_pad_circular']}"
                )
    dtype, device = _param_like(module)
    x = torch.zeros(batch, 3, H, W, dtype=dtype, device=device)

    def f(x):
        return fn(x)

    # tracing must leave the module as it was (a BatchNorm in training mode would count a batch)
    saved = [(b, b.detach().clone()) for b in module.buffers()] if isinstance(module, torch.nn.Module) else []
    try:
        # under no_grad, as every certifier runs the model: a forward that branches on torch.is_grad_enabled()
        # is traced on the path that is certified, whatever the caller's grad mode
        with _InputsUnchecked(module), warnings.catch_warnings(), torch.no_grad(), _NoValueReads(module):
            warnings.simplefilter("ignore")
            gm = make_fx(functionalize(f), tracing_mode="fake", _allow_non_fake_inputs=True)(x)
    except GeometryError:
        raise
    except Exception as e:  # the tracer's failures are reasons to refuse, not crashes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = type(e).__name__
        data_dep = "DataDependent" in kind or "data-dependent" in str(e) or "GuardOnDataDependent" in kind
        why = ("its computation branches on pixel values (data-dependent control flow), so no structural trace "
               "holds for every image" if data_dep else f"tracing failed ({kind}: {first[:200]})")
        raise GeometryError(f"cannot establish the geometry of {_describe(module)} on {H}x{W} images: {why}; "
                            "make the local-logit computation traceable (no branching on pixel values), or certify with certify_logits under your own responsibility") from None
    finally:
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape and not torch.equal(b, value):
                    b.copy_(value)
    return gm


@dataclass(frozen=True)
class _Inferred:
    geometry: Geometry | None  # None: the output does not depend on the image at all
    rows: tuple  # (lo, hi) long [h]
    cols: tuple  # (lo, hi) long [w]
    num_classes: int
    grid: tuple  # (h, w)


def _fit(ax: _Axis, n_img: int, what: str, module) -> tuple[int, int, int]:
    nonempty = ax.lo <= ax.hi
    if not bool(nonempty.any()):
        raise GeometryError(f"{_describe(module)}: no output location depends on the image along the {what}")
    S = ax.stride
    if S is None or S < 1:
        raise GeometryError(f"{_describe(module)}: the stride along the {what} cannot be established")
    i = torch.arange(ax.n)
    P = int((i * S - ax.lo)[nonempty].max())
    end = int((ax.hi - i * S)[nonempty].max())
    return end + P + 1, S, P


def _images(batch: int) -> str:
    return "one image" if batch == 1 else f"{batch} images"


def _check_image_memory(H: int, W: int, images: int) -> None:
    """Refuse (ValueError, one line) an image size whose float32 input batch of ``images`` would not fit half of
    this machine's physical memory, before anything is allocated."""
    need = images * 3 * H * W * 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: let torch's allocator decide
        return
    if need > total // 2:
        raise ValueError(f"images of {H}x{W} pixels are too large to analyse on this machine: {images} of them take "
                         f"{need / 2**30:.1f} GiB, more than half of its {total / 2**30:.1f} GiB of memory")


def _infer(module, image_size, extra_batches=()) -> _Inferred:
    H, W = normalize_image_size(image_size)
    # traced with a batch of 2, of 1 and of every batch size in ``extra_batches`` (the fixed chunk that
    # bagcert.certify evaluates the model at, :func:`bagcert.inference.chunk_size`): Python code that branches on
    # the batch size (``if x.shape[0] == 1``, ``x.squeeze()``) is followed at each, and all must give the same
    # dependency
    batches = [2, 1] + sorted({int(b) for b in extra_batches} - {1, 2})
    _check_image_memory(H, W, max(batches + [9]))  # the traced batches and the 9 probe images of _probe_check
    found = []
    for batch in batches:
        gm = _trace(module, H, W, batch)
        try:
            dep, shape = _analyse(gm, H, W)
        except _Refuse as e:
            extra = "" if batch == 2 else f" (with a batch of {_images(batch)})"
            raise GeometryError(f"cannot establish the geometry of {_describe(module)} on {H}x{W} images{extra}: "
                                f"{e}") from None
        found.append((dep, shape))
    (dep, shape) = found[0]
    for batch, (dep_b, shape_b) in zip(batches[1:], found[1:]):
        if not _same_dependency(dep, shape, dep_b, shape_b):
            raise GeometryError(f"cannot establish the geometry of {_describe(module)} on {H}x{W} images: it computes "
                                f"a batch of {_images(batch)} differently from a batch of two "
                                "(Python code that branches on the batch size), so no single geometry holds for every "
                                "batch")
    if dep is None:  # a constant map: no patch can change it, any declared geometry is sound for it
        if shape is None or len(shape) != 4 or shape[1] < 2:
            raise GeometryError(f"{_describe(module)} returns {shape}; expected local logits [B, C, h, w], C >= 2")
        empty = (torch.full((shape[2],), _BIG), torch.full((shape[2],), -_BIG))
        empty_w = (torch.full((shape[3],), _BIG), torch.full((shape[3],), -_BIG))
        return _Inferred(None, empty, empty_w, int(shape[1]), (shape[2], shape[3]))
    if len(shape) != 4 or _plain(dep.labels[2], shape[2]) != "H" or _plain(dep.labels[3], shape[3]) != "W":
        where = ["x".join(c[0] for c in comps) or "-" for comps in dep.labels]
        raise GeometryError(
            f"{_describe(module)} returns a tensor of shape {list(shape)} whose dimensions hold {where} (H image "
            "rows, W image columns, B batch); expected local logits [B, C, h, w] with the image rows and columns in "
            "the last two dimensions"
        )
    if shape[1] < 2:
        raise GeometryError(f"{_describe(module)} returns {shape[1]} class map(s); expected [B, C, h, w] with C >= 2")
    rh = _fit(dep.axes["H"], H, "image rows", module)
    rw = _fit(dep.axes["W"], W, "image columns", module)
    h, w = shape[2], shape[3]
    geom = Geometry((rh[0], rw[0]), (rh[1], rw[1]), (rh[2], rw[2]), grid=((H, W), (h, w)))
    ax_h, ax_w = dep.axes["H"], dep.axes["W"]
    return _Inferred(geom, (ax_h.lo.clone(), ax_h.hi.clone()), (ax_w.lo.clone(), ax_w.hi.clone()), int(shape[1]), (h, w))


def _same_dependency(dep, shape, dep1, shape1) -> bool:
    """The traces at batch sizes 2 and 1 give the same class maps with the same pixel intervals."""
    if (dep is None) != (dep1 is None) or shape is None or shape1 is None or shape[1:] != shape1[1:]:
        return False
    if dep is None:
        return True
    if len(shape) == 4 and [_plain(dep.labels[d], shape[d]) for d in (2, 3)] != \
            [_plain(dep1.labels[d], shape1[d]) for d in (2, 3)]:
        return False
    return all(torch.equal(dep.axes[k].lo, dep1.axes[k].lo) and torch.equal(dep.axes[k].hi, dep1.axes[k].hi)
               and dep.axes[k].stride == dep1.axes[k].stride for k in ("H", "W"))


def _probe_check(module, inferred: _Inferred, H: int, W: int, seed: int = 0) -> None:
    """Cross-check with the real module: input gradients of a few locations must stay inside their boxes."""
    fn = _logit_function(module)
    g = inferred.geometry
    h, w = inferred.grid
    dtype, device = _param_like(module)
    rows = sorted({0, h // 2, h - 1})
    cols = sorted({0, w // 2, w - 1})
    locs = [(i, j) for i in rows for j in cols]
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(len(locs), 3, H, W, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    with torch.enable_grad():
        out = fn(x * 1)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[-2:]) != (h, w) \
                or out.shape[0] != len(locs):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GeometryError(f"cross-check failed for {_describe(module)}: the traced grid is {h}x{w} but the "
                                f"module returns {got} for {len(locs)} images of {H}x{W}")
        sel = torch.stack([out[b, :, i, j].sum() for b, (i, j) in enumerate(locs)]).sum()
        if not sel.requires_grad:
            return
        (grad,) = torch.autograd.grad(sel, x, allow_unused=True)
    if grad is None:
        return
    mag = grad.detach().abs().sum(dim=1)  # [B, H, W]
    if g is None:
        if bool((mag != 0).any()):
            raise GeometryError(f"cross-check failed for {_describe(module)}: the trace found no dependency on the image "
                                "but the input gradient is nonzero; please report this model")
        return
    for b, (i, j) in enumerate(locs):
        nz = torch.nonzero(mag[b])
        if nz.numel() == 0:
            continue
        top, left, bottom, right = g.pixel_box(i, j, (H, W))
        r0, c0 = nz.min(dim=0).values.tolist()
        r1, c1 = nz.max(dim=0).values.tolist()
        if r0 < top or r1 > bottom or c0 < left or c1 > right:
            raise GeometryError(
                f"cross-check failed for {_describe(module)}: location ({i}, {j}) depends on pixels rows {r0}..{r1}, "
                f"columns {c0}..{c1}, outside its inferred box rows {top}..{bottom}, columns {left}..{right}; the "
                "structural trace missed a dependency: please report this model"
            )


def infer_geometry(module, image_size, *, check: bool = True, batch_sizes=()) -> Geometry:
    """The exact receptive-field geometry of ``module`` on images of ``image_size``, per axis.

    Args:
        module: a ``torch.nn.Module`` (or callable) mapping float images [B, 3, H, W] to local logits
            [B, C, h, w]; a module with a ``local_logits`` method (a bagcert model) is analysed through that
            method, on [0, 1] images. Put it in eval mode first (BatchNorm in training mode is refused).
        image_size: ``(H, W)`` in pixels.
        check: also run the gradient cross-check with the module's own weights (one forward and backward pass
            on a few random images; see the module doc).
        batch_sizes: batch sizes to trace at besides 2 and 1 (ints >= 1): a module whose computation branches on
            the batch size is refused unless every traced batch gives the same dependency.
            :func:`verify_geometry` adds the fixed chunk at which :func:`bagcert.certify` evaluates the model.

    Returns:
        A :class:`~bagcert.geometry.Geometry` with per-axis ``receptive_field``, ``stride``, ``padding`` (pixels)
        and ``grid = ((H, W), (h, w))``. It has no layer chain: its grid is known for this image size only.

    Raises:
        GeometryError (a ValueError): the geometry cannot be established, with the reason: an operation whose
            output location depends on the whole image (global / adaptive pooling, flatten + linear, attention,
            group / instance norm, BatchNorm in training mode), interpolation, circular padding, pixel-value-
            dependent control flow, an unknown operation, an output that is not [B, C, h, w]; or the cross-check
            failed.
        TypeError / ValueError: ``module`` is not callable; ``image_size`` is not a (height, width) pair.
    """
    H, W = normalize_image_size(image_size)
    _logit_function(module)
    if isinstance(batch_sizes, (str, bytes)) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a sequence of ints >= 1 (batch sizes to trace at), got {batch_sizes!r}")
    inferred = _infer(module, (H, W), batch_sizes)
    if check:
        _probe_check(module, inferred, H, W)
    if inferred.geometry is None:
        raise GeometryError(f"{_describe(module)}: its output does not depend on the image, so it has no receptive "
                            "field to infer (any declared geometry is sound for it)")
    return inferred.geometry


# ------------------------------------------------------------------------------------------------------------------
# checking a declared geometry
# ------------------------------------------------------------------------------------------------------------------
def _clipped_axis(geometry: Geometry, axis: int, n_loc: int, n_img: int):
    i = torch.arange(n_loc)
    lo = i * geometry.stride[axis] - geometry.padding[axis]
    hi = lo + geometry.receptive_field[axis] - 1
    return lo.clamp(min=0), hi.clamp(max=n_img - 1)


def _text(g: Geometry) -> str:
    def one(v):
        return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"

    return f"receptive field {one(g.receptive_field)}, stride {one(g.stride)}, padding {one(g.padding)}"


def geometry_report(declared: Geometry, module, image_size, *, check: bool = True):
    """Compare ``declared`` with the geometry inferred from ``module`` on ``image_size`` images.

    Returns ``(status, inferred, message)`` with ``status`` one of ``"equal"`` (every location's clipped box is the
    true one), ``"covers"`` (a superset for every location: sound, more conservative) or ``"fails"`` (some
    location's true pixels lie outside its declared box, or the grid sizes differ); ``message`` explains
    ``"covers"`` and ``"fails"`` naming both geometries. Raises :class:`GeometryError` when the geometry of
    ``module`` cannot be established.
    """
    H, W = normalize_image_size(image_size)
    inferred = _infer(module, (H, W))
    if check:
        _probe_check(module, inferred, H, W)
    status, msg = _compare(declared, inferred, H, W, _describe(module))
    return status, inferred.geometry, msg  # inferred None: the output does not depend on the image


def _compare(declared: Geometry, inferred: _Inferred, H: int, W: int, name: str) -> tuple[str, str]:
    true = inferred.geometry
    h, w = inferred.grid
    dgrid = declared.grid_size(H, W) if declared.knows_grid(H, W) else (h, w)  # no chain: the logit map's grid
    if dgrid != (h, w):
        return "fails", (
            f"the declared geometry of {name} ({_text(declared)}) gives a {dgrid[0]}x{dgrid[1]} grid on {H}x{W} "
            f"images but the model returns {h}x{w} locations"
            + (f" (inferred: {_text(true)})" if true is not None else "")
        )
    if true is None:  # a constant map: nothing a patch can change
        return "equal", ""
    status = "equal"
    for axis, (lo_t, hi_t), n_loc, n_img, what in ((0, inferred.rows, h, H, "rows"), (1, inferred.cols, w, W, "columns")):
        lo_d, hi_d = _clipped_axis(declared, axis, n_loc, n_img)
        nonempty = lo_t <= hi_t
        bad = nonempty & ((lo_d > lo_t) | (hi_d < hi_t))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            return "fails", (
                f"the declared geometry of {name} ({_text(declared)}) does not cover the inferred one "
                f"({_text(true)}) on {H}x{W} images: location {k} along the {what} sees pixels "
                f"{int(lo_t[k])}..{int(hi_t[k])} but the declared box is {int(lo_d[k])}..{int(hi_d[k])}; "
                "a certificate with the declared geometry would be unsound"
            )
        lo_f, hi_f = _clipped_axis(true, axis, n_loc, n_img)
        if bool(((lo_d < lo_f) | (hi_d > hi_f)).any()):
            status = "covers"
    msg = "" if status == "equal" else (
        f"the declared geometry of {name} ({_text(declared)}) is larger than the inferred one ({_text(true)}) on "
        f"{H}x{W} images: sound, but certificates are more conservative than they need to be"
    )
    return status, msg


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _fingerprint(model) -> tuple:
    """What the cache key watches: the model's :func:`_structure` and every submodule's train/eval mode."""
    if not isinstance(model, torch.nn.Module):
        return (id(model),)
    return _structure(model) + (tuple(m.training for m in model.modules()),)


_PLAIN = (bool, int, float, str, type(None))
_UNWATCHED = {"training", "check_inputs", "num_classes"}  # not part of the computation's geometry


def _plain_value(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and len(v) <= 16 and all(isinstance(e, _PLAIN) for e in v))


def _settings(m) -> str:
    """A layer's settings (kernel, stride, padding...), from ``extra_repr`` (a bagcert model's own line names its
    declared geometry, which is compared separately, so it is left out), plus the shapes of its own parameters and
    buffers, its plain attributes (numbers, strings, flags and tuples of them) and its forward hooks: replacing a weight by one with a
    larger kernel (``padding='same'`` keeps the grid) or setting a flag that ``forward`` branches on changes it."""
    from .models.base import BagModel

    text = "" if isinstance(m, BagModel) else m.extra_repr()
    shapes = tuple((n, tuple(t.shape)) for n, t in list(m._parameters.items()) + list(m._buffers.items())
                   if t is not None)
    plain = tuple(sorted((k, v) for k, v in vars(m).items()
                         if not k.startswith("_") and k not in _UNWATCHED and _plain_value(v)))
    hooks = tuple(id(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values())
    return f"{text}|{shapes}|{plain}|{hooks}"


def _trusted(model) -> bool:
    """A built-in registry model whose modules and geometry are those its constructor made."""
    from .models.bagnet import BagNet
    from .models.cifar import CifarBagNet
    from .models.vit import WindowViT

    if type(model) not in (BagNet, CifarBagNet, WindowViT):
        return False
    mark = getattr(model, "_built_geometry", None)
    return mark is not None and mark[0] is model.geometry and mark[1] == _structure(model)


def _global_hooks() -> tuple:
    """Forward hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules import module as _m

    return tuple(id(h) for d in (_m._global_forward_pre_hooks, _m._global_forward_hooks) for h in d.values())


def _structure(model) -> tuple:
    """Every submodule (name, identity, type, :func:`_settings`) and the global forward hooks."""
    return tuple((name, id(m), type(m).__name__, _settings(m)) for name, m in model.named_modules()) \
        + (_global_hooks(),)


def mark_built(model) -> None:
    """Record that ``model``'s geometry is the one its constructor derived from its own layers (built-in
    registry classes only; any later change of a submodule or of ``model.geometry`` drops the trust)."""
    model._built_geometry = (model.geometry, _structure(model))


def verify_geometry(model, image_size) -> Geometry:
    """The geometry to certify ``model`` with on ``image_size`` images, after checking it against the model.

    * Built-in registry models (``bagcert.create_model``: BagNet, CifarBagNet, unchanged since construction)
      are trusted: their constructor derives the geometry from the layers it builds (the tests check that the
      inferred geometry equals it for every registry model).
    * A model with ``infer_geometry_at`` (:func:`bagcert.wrap_model` without a declared geometry) returns its
      inferred geometry.
    * Any other model's declared ``model.geometry`` is compared with :func:`infer_geometry` (including the
      gradient cross-check): equal -> returned; a covering superset -> returned with a :class:`GeometryWarning`;
      anything else -> :class:`GeometryError` naming both.

    The inferred geometry is cached per model (weakly: the cache never keeps a model alive) and image size, keyed
    by a fingerprint of the model's submodules (identity, type, ``extra_repr()`` settings such
    as kernel, stride, padding and dilation, the shapes of their parameters and buffers, their plain attributes
    (numbers, strings, flags), train/eval mode, forward hooks, also global ones): replacing a layer or a weight, adding a hook, changing a convolution's settings or
    a flag that ``forward`` branches on triggers a new inference; a new ``model.geometry`` is compared again (cheap). The warning for a larger
    declaration is given once per model, image size and declaration. Editing ``forward`` code on a live object is not
    detected: call ``bagcert.geometry_inference.clear_cache()`` after doing so.

    Raises:
        GeometryError: the declared geometry does not cover the true one, or the true one cannot be established.
        TypeError: ``model`` has no ``geometry``.
    """
    H, W = normalize_image_size(image_size)
    infer_at = getattr(model, "infer_geometry_at", None)
    if callable(infer_at) and getattr(model, "declared_geometry", None) is None:
        return infer_at((H, W))
    declared = getattr(model, "geometry", None)
    if not isinstance(declared, Geometry):
        raise TypeError(f"model.geometry must be a bagcert Geometry, got {type(declared).__name__}: declare it "
                        "(Geometry.from_layers([...]) or Geometry(rf, stride, padding)) or let bagcert.wrap_model "
                        "infer it")
    if _trusted(model):
        return declared
    key = ((H, W), _fingerprint(model))
    try:
        with _LOCK:
            per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: check every time
        per_model = {}
    entry = per_model.get(key)
    if entry is None:
        from .inference import chunk_size

        inferred = _infer(model, (H, W), (chunk_size(model, (H, W)),))  # also at the batch certify runs it at
        _probe_check(model, inferred, H, W)
        entry = (inferred, {})  # the inferred geometry and the verdicts on the declarations seen so far
        with _LOCK:
            if len(per_model) >= 16:  # stale keys (old fingerprints) cannot pile up
                per_model.clear()
            per_model[key] = entry
    inferred, verdicts = entry
    verdict = verdicts.get(declared)
    if verdict is None:
        verdict = _compare(declared, inferred, H, W, _describe(model))
        verdicts[declared] = verdict
        if verdict[0] == "covers":  # warned once per (model, image size, declaration)
            warnings.warn(verdict[1], GeometryWarning, stacklevel=2)
    if verdict[0] == "fails":
        raise GeometryError(verdict[1])
    return declared


def clear_cache() -> None:
    """Forget every cached verdict of :func:`verify_geometry`."""
    with _LOCK:
        _CACHE.clear()
