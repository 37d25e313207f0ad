"""Load the public BagNet ImageNet weights (Brendel & Bethge, ICLR 2019) into bagcert's BagNet-9/17/33.

The original PyTorch models (``bagnets/pytorchnet.py`` of wielandbrendel/bag-of-local-features-models) publish
their weights as plain state dicts (``bagnet8-34f4ccd2.pth.tar`` for BagNet-9, ``bagnet16-105524de.pth.tar``
for BagNet-17, ``bagnet32-2ddd53ed.pth.tar`` for BagNet-33: the file names count the receptive field minus
one). Their module layout is the one of :class:`bagcert.models.BagNet`, name for name:

=====================================================  =====================================================
original key (shape at full width)                     bagcert key
=====================================================  =====================================================
``conv1.weight`` [64, 3, 1, 1]                         ``conv1.weight`` (stem 1x1 convolution)
``conv2.weight`` [64, 64, 3, 3]                        ``conv2.weight`` (stem 3x3 convolution, unpadded)
``bn1.{weight,bias,running_mean,running_var,``         ``bn1.*`` (the stem's one BatchNorm, after ``conv2``)
``num_batches_tracked}``
``layerS.B.conv{1,2,3}.weight``, ``layerS.B.bn{1,2,3}.*``  the same (bottleneck ``B`` of stage ``S``)
``layerS.0.downsample.{0,1}.*``                        the same (1x1 convolution + BatchNorm of the residual)
``fc.weight`` [1000, 2048] (``nn.Linear``)             ``fc.weight`` [1000, 2048, 1, 1] (the classifier as a
                                                       1x1 convolution, applied per location: same numbers)
``fc.bias`` [1000]                                     ``fc.bias``
(none)                                                 ``mean``, ``std``: bagcert's input normalisation
                                                       (ImageNet's, which the original weights expect)
=====================================================  =====================================================

The three variants differ only in which stages keep a 3x3 kernel in their first bottleneck's ``conv2``
(BagNet-9: layer1, layer2; BagNet-17: also layer3; BagNet-33: also layer4); the converter reads that from the
file and refuses weights of another receptive field than the model's, naming both. Stage strides 2, 2, 2, 1,
unpadded convolutions and the bottom/right crop of the residual are the same in both implementations, so
``model.local_logits(x)`` equals the original's per-location logits (``avg_pool=False``) of the normalised
image and ``model.mean_logits(x)`` its pooled logits.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import FORMAT as _BAGCERT_FORMAT
from ..checkpoint import CheckpointError, _is_zip_file, _one_line, safe_torch_load
from .bagnet import _KERNEL3, BagNet

__all__ = ["load_bagnet_state_dict", "read_weights_file", "original_layout", "PUBLIC_WEIGHT_FILES"]

# the file names under which the original repository publishes its ImageNet weights (pytorchnet.py's model_urls)
PUBLIC_WEIGHT_FILES = {
    "bagnet9": "bagnet8-34f4ccd2.pth.tar",
    "bagnet17": "bagnet16-105524de.pth.tar",
    "bagnet33": "bagnet32-2ddd53ed.pth.tar",
}

# bagcert tensors the original layout has no counterpart for: the input normalisation inside the model
_BAGCERT_ONLY = ("mean", "std")
# torch's legacy (pre-1.6) serialisation starts with a protocol-2 pickle of its magic number (a 10-byte long)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"
_WRAPPERS = ("state_dict", "model")
_PREFIX = "module."


def read_weights_file(path):
    """Read a torch file with weights-only loading (only tensors and builtins are unpickled), tensors on the CPU.

    Both of torch's formats are read: the zip archive of torch >= 1.6 (through
    :func:`bagcert.checkpoint.safe_torch_load`, which checks the archive's CRC-32 sums first) and the legacy
    format of older versions, in which the public BagNet weights may be stored.

    Returns:
        The stored object (for the public weights an ``OrderedDict`` of named tensors).

    Raises:
        CheckpointError: one line naming the file: missing, a folder, neither of torch's formats, damaged or
            truncated, or holding pickled objects other than tensors and builtins (refused before anything
            from it runs).
    """
    path = Path(path)
    what = "BagNet weights file"
    is_zip = _is_zip_file(path, what, "a torch file such as bagnet16-105524de.pth.tar")
    if is_zip:
        return safe_torch_load(path, what=what, verify=True)
    with open(path, "rb") as f:  # the file was just found readable
        legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    if not legacy:
        raise CheckpointError(
            f"{path} is not a torch file (neither a zip archive nor torch's legacy format; size "
            f"{path.stat().st_size} bytes); expected BagNet weights saved with torch.save, e.g. bagnet16-105524de.pth.tar"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            detail = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {path}: it holds a pickled object{detail} that is not a tensor or builtin; "
                "weights-only loading refused this unsafe content and nothing from it was run"
            ) from None
        raise CheckpointError(f"{path} is a damaged torch file: its pickle data cannot be read ({_one_line(e, 160)})") from None
    except Exception as e:  # any other failure of the reader: the file is incomplete or damaged
        raise CheckpointError(f"{path} is truncated or not a complete torch file ({type(e).__name__}: {_one_line(e, 200)})") from None


def original_layout(model: BagNet) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of the original implementation's model that fits ``model``.

    Args:
        model: a :class:`bagcert.models.BagNet` (any receptive field, width and class count).

    Returns:
        ``{original key: shape}`` in the model's order: every tensor of ``model.state_dict()`` except ``mean``
        and ``std``, with ``fc.weight`` as the original's ``nn.Linear`` weight ``[num_classes, in_features]``.
    """
    _check_model(model)
    out = {}
    for key, value in model.state_dict().items():
        if key in _BAGCERT_ONLY:
            continue
        out[key] = tuple(value.shape[:2]) if key == "fc.weight" else tuple(value.shape)
    return out


def _check_model(model) -> None:
    if not isinstance(model, BagNet):
        name = getattr(model, "config", {}).get("name") if isinstance(getattr(model, "config", None), dict) else None
        raise TypeError(
            f"BagNet weights load only into a bagcert BagNet (bagnet9, bagnet17, bagnet33), got a {type(model).__name__}"
            + (f" ({name!r})" if name else "")
        )


def _model_rf(model: BagNet) -> int:
    return int(model.geometry.receptive_field[0])


def _file_rf(state: Mapping) -> int | None:
    """The receptive field the file's kernel sizes give (3x3 kernels in the first bottleneck of which stages)."""
    kernels = []
    for stage in range(1, 5):
        w = state.get(f"layer{stage}.0.conv2.weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            return None
        kernels.append(1 if w.shape[-1] == 3 else 0)
    for rf, k3 in _KERNEL3.items():
        if tuple(kernels) == k3:
            return rf
    return None


def _shape(t) -> list[int]:
    return list(t.shape)


def _list(keys, limit: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _unwrap(obj, name: str):
    """The state dict inside ``obj`` and the wrapper key it was under (None: ``obj`` is the state dict)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}; expected a state dict (names -> tensors)")
    if obj.get("format") == _BAGCERT_FORMAT:
        raise CheckpointError(
            f"{name} is a bagcert checkpoint, not BagNet weights in the original layout; load it with "
            "bagcert.load_checkpoint"
        )
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    inner = [k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)]
    if len(inner) > 1:
        raise CheckpointError(
            f"{name} holds both a 'state_dict' and a 'model' dict; expected one state dict (names -> tensors)"
        )
    if not inner:
        keys = [str(k) for k in obj][:5]
        raise CheckpointError(
            f"{name} is not a state dict: expected names -> tensors, or such a dict under 'state_dict' or 'model'; "
            f"found keys {keys}" + (" ..." if len(obj) > 5 else "")
        )
    return obj[inner[0]], inner[0]


def load_bagnet_state_dict(source, model: BagNet, strict: bool = True, name: str | None = None) -> dict:
    """Copy BagNet weights in the original implementation's layout into a bagcert BagNet, after checking them all.

    Accepted: the public files as published (a state dict), the same dict saved by ``nn.DataParallel`` (every
    key prefixed ``module.``; the prefix is removed), or wrapped under a ``'state_dict'`` or ``'model'`` key;
    files in torch's zip or legacy format, always read with weights-only loading (:func:`read_weights_file`).
    Nothing is copied unless every check passes, so a refused file leaves ``model`` unchanged.

    Checks: every key and shape against :func:`original_layout` (``fc.weight`` is ``[classes, in_features]``
    in the file and is reshaped to the per-location 1x1 convolution); the file's receptive field (from its
    kernel sizes) equals the model's; floating-point tensors are finite and stored as floating point. The
    classifier (``fc.weight``, ``fc.bias``) is loaded only when its class count equals ``model.num_classes``;
    otherwise both are skipped and keep the model's initialisation (a new head to fine-tune), and the report
    says so. A file without BatchNorm's ``num_batches_tracked`` counters (written before torch 0.4.1) is
    accepted; the model keeps its own counters, as it keeps ``mean`` / ``std`` (its ImageNet normalisation).

    Args:
        source: a path (str or os.PathLike) to a torch file, or an already loaded mapping (the state dict or a
            wrapper dict as above).
        model: a :class:`bagcert.models.BagNet` (``bagnet9`` / ``bagnet17`` / ``bagnet33``, any class count; its
            width must be that of the weights: 1.0 for the public ones). On any device.
        strict: refuse keys the model lacks (unexpected) and model tensors the file lacks (missing). With
            ``strict=False`` both are only reported, and missing tensors keep the model's values.
        name: for a mapping, the file it was read from (e.g. with :func:`read_weights_file`): named in the
            messages and returned as ``path``.

    Returns:
        A dict of builtins: ``path`` (str; for a mapping ``name``, or None), ``source_receptive_field`` (9 / 17 / 33),
        ``wrapper`` (``'state_dict'``, ``'model'`` or None), ``prefix_stripped`` (``'module.'`` or None),
        ``loaded`` (number of tensors copied), ``skipped`` (keys in the file not loaded, here the classifier),
        ``skip_reason`` (str or None), ``missing`` and ``unexpected`` (lists, empty when strict), ``kept`` (model
        keys kept at the model's values that the file has no counterpart for) and ``summary`` (one line).

    Raises:
        TypeError: ``model`` is not a bagcert BagNet, or ``source`` is neither a path nor a mapping.
        CheckpointError: one line naming the file (or ``<state dict>``) and what is wrong: unreadable or unsafe
            file (see :func:`read_weights_file`), a bagcert checkpoint (load those with ``bagcert.load_checkpoint``),
            not a state dict, weights of another receptive field than the model's, a tensor of the wrong shape
            (named with both shapes), a non-floating or non-finite weight, and (strict) missing or unexpected keys.
    """
    _check_model(model)
    if isinstance(source, (str, os.PathLike)):
        path, name = str(source), str(source)
        obj = read_weights_file(source)
    elif isinstance(source, Mapping):
        path, name = (None, "<state dict>") if name is None else (str(name), str(name))
        obj = source
    else:
        raise TypeError(f"source must be a path or a state dict (a mapping of names to tensors), got {type(source).__name__}")

    state, wrapper = _unwrap(obj, name)
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{name}: state dict keys must be strings, found {bad_keys[0]!r}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{name}: entries {_list(not_tensors)} are not tensors (the first is a {type(state[not_tensors[0]]).__name__}); "
            "expected a state dict of named tensors"
        )
    prefix = None
    if state and all(k.startswith(_PREFIX) for k in state):
        prefix = _PREFIX
        state = {k[len(_PREFIX):]: v for k, v in state.items()}

    model_name = (model.config or {}).get("name") or type(model).__name__
    want = original_layout(model)
    rf, src_rf = _model_rf(model), _file_rf(state)
    if src_rf is not None and src_rf != rf:
        raise CheckpointError(
            f"{name} holds BagNet-{src_rf} weights (receptive field {src_rf}), but the model {model_name!r} is a "
            f"BagNet-{rf}: use the model bagnet{src_rf} (the original repository's file for BagNet-{src_rf} is "
            f"{PUBLIC_WEIGHT_FILES[f'bagnet{src_rf}']})"
        )

    skipped, skip_reason = [], None
    fc = state.get("fc.weight")
    fc_want = want["fc.weight"]
    if isinstance(fc, torch.Tensor) and fc.dim() == 2 and fc.shape[1] == fc_want[1] and fc.shape[0] != fc_want[0]:
        bias = state.get("fc.bias")
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (fc.shape[0],):
            raise CheckpointError(
                f"{name}: fc.bias {_shape(bias)} does not fit fc.weight {_shape(fc)} (expected [{fc.shape[0]}])"
            )
        skipped = [k for k in ("fc.weight", "fc.bias") if k in state]
        skip_reason = (
            f"the file's classifier has {fc.shape[0]} classes and the model {fc_want[0]}: the model keeps its own "
            "new classifier (fc), to be trained"
        )

    wrong = [
        f"{k} {_shape(state[k])} (expected {list(want[k])})"
        for k in want
        if k in state and k not in skipped and tuple(state[k].shape) != want[k]
    ]
    if wrong:
        hint = ""
        if "conv1.weight" in state and state["conv1.weight"].dim() == 4 and state["conv1.weight"].shape[0] != want["conv1.weight"][0]:
            hint = (
                f"; the file's stem has {state['conv1.weight'].shape[0]} channels and the model's "
                f"{want['conv1.weight'][0]}: the model's width must be that of the weights (1.0 for the public ones)"
            )
        raise CheckpointError(
            f"{name}: {len(wrong)} tensor(s) do not fit the model {model_name!r}: {'; '.join(wrong[:3])}"
            + ("; ..." if len(wrong) > 3 else "") + hint
        )

    target = model.state_dict()
    for k in want:
        if k not in state or k in skipped:
            continue
        t, w = state[k], target[k]
        if w.is_floating_point():
            if not t.is_floating_point():
                raise CheckpointError(f"{name}: {k} has dtype {t.dtype}; expected a floating-point tensor")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name}: {k} holds NaN or Inf values; expected finite weights")
        elif t.is_floating_point() or t.is_complex():
            raise CheckpointError(f"{name}: {k} has dtype {t.dtype}; expected an integer tensor ({w.dtype})")

    missing = [k for k in want if k not in state and not k.endswith(".num_batches_tracked")]
    counters = [k for k in want if k not in state and k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_list(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_list(unexpected)})")
        raise CheckpointError(
            f"{name}: the weights do not match the original BagNet-{rf} layout of {model_name!r}: "
            + ", ".join(problems) + " tensors"
        )

    converted = {}
    for k in want:
        if k in state and k not in skipped:
            t = state[k]
            converted[k] = t.reshape(target[k].shape) if k == "fc.weight" else t
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # converted holds only the model's own keys

    kept = list(_BAGCERT_ONLY) + counters + [k for k in missing]
    src_rf = src_rf if src_rf is not None else rf
    summary = f"loaded {len(converted)} tensors of BagNet-{src_rf} weights from {name}"
    if skipped:
        summary += f"; skipped {', '.join(skipped)} ({skip_reason})"
    if missing:
        summary += f"; {len(missing)} model tensors not in the file keep their values ({_list(missing)})"
    if unexpected:
        summary += f"; {len(unexpected)} tensors of the file ignored ({_list(unexpected)})"
    return {
        "path": path,
        "source_receptive_field": src_rf,
        "wrapper": wrapper,
        "prefix_stripped": prefix,
        "loaded": len(converted),
        "skipped": skipped,
        "skip_reason": skip_reason,
        "missing": missing,
        "unexpected": unexpected,
        "kept": kept,
        "summary": summary,
    }
