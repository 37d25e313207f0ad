"""Model registry: ``create_model(name, num_classes=..., **kwargs)`` and ``list_models()``.

Every model records ``model.config = {"name": ..., "kwargs": {...}}`` so that a checkpoint can
rebuild it from the registry. Models from outside the package are registered the same way, by an
installed plugin (entry point group ``bagcert.models``) or a model module (``--model-module``), see
:mod:`bagcert.models.plugins` and docs/own_model_plugin.md.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from torch import nn

from ..geometry import Geometry
from .bagnet import BagNet
from .base import IMAGENET_MEAN, IMAGENET_STD, BagModel, InputError, check_images
from .cifar import CifarBagNet
from .vit import WindowViT
from .region import RegionResNet, resnet_bagnet, resnet_receptive_fields, resnet_to_bagnet
from .plugins import ENTRY_POINT_GROUP, PluginError, load_model_module, load_plugins

__all__ = ["create_model", "list_models", "register_model", "to_dense", "BagModel", "BagNet", "CifarBagNet", "InputError",
           "check_images", "RegionResNet", "resnet_to_bagnet", "resnet_receptive_fields", "WindowViT",
           "ENTRY_POINT_GROUP", "PluginError", "load_model_module", "load_plugins"]

_REGISTRY: dict[str, tuple[Callable, dict, str]] = {}


def _origin(factory) -> tuple:
    """(qualified name, source file) of a factory: the same definition executed twice (a model file imported
    both by ``--model-module`` and by ``import``) has the same origin."""
    code = getattr(factory, "__code__", None)
    if code is None and inspect.isclass(factory):  # a class: the file of its first method defined in Python
        code = next((v.__code__ for v in vars(factory).values() if hasattr(v, "__code__")), None)
    source = code.co_filename if code is not None else None
    if source is None:
        try:
            source = inspect.getfile(factory)
        except (TypeError, OSError):
            source = None
    return (getattr(factory, "__qualname__", None), source)


def register_model(name: str, factory: Callable, description: str = "", **defaults) -> None:
    """Add a model constructor to the registry under ``name``; ``create_model(name, ...)`` then builds it.

    Args:
        name: the registry name (recorded in checkpoints; a checkpoint loads only where ``name`` is registered).
        factory: a class or function ``factory(num_classes=..., **kwargs)`` returning a :class:`BagModel`
            (``features_to_logits`` and ``self.geometry``), or an ``nn.Module`` with ``local_logits(x)``
            [B, C, h, w], a :class:`~bagcert.geometry.Geometry` in ``.geometry`` and ``.num_classes``.
        description: one line for listings.
        **defaults: keyword arguments of the preset (builtins only, so that checkpoints can record them);
            ``create_model``'s keyword arguments override them.

    Raises:
        ValueError: ``name`` is empty or not a str, or already registered by another definition (registering
            the same definition again, e.g. a model file imported twice, replaces the entry).
        TypeError: ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"model name must be a non-empty str without surrounding spaces, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_model({name!r}, ...): factory must be a class or function that builds the model, "
                        f"got {type(factory).__name__}")
    if name in _REGISTRY and _origin(_REGISTRY[name][0]) != _origin(factory):
        qualname, source = _origin(_REGISTRY[name][0])
        where = f" by {qualname}" + (f" in {source}" if source else "") if qualname else ""
        raise ValueError(f"model {name!r} is already registered{where}; choose another name")
    _REGISTRY[name] = (factory, defaults, description)


def _is_registered(name: str) -> bool:
    """Whether ``name`` is registered, loading the installed plugins first when it is not (PluginError when one
    fails)."""
    if name in _REGISTRY:
        return True
    load_plugins()
    return name in _REGISTRY


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registry names, optionally filtered by a substring; installed plugins are loaded first.

    Raises:
        PluginError (a ValueError): an installed plugin failed to load (one line naming it).
    """
    load_plugins()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or pattern in n]


def _check_built(name: str, factory, model) -> None:
    """Refuse what a factory returned unless bagcert can certify it and save it (one line)."""
    who = getattr(factory, "__name__", type(factory).__name__)
    expected = ("expected a bagcert.BagModel subclass (features_to_logits and self.geometry = Geometry.from_layers([...])) "
                "or an nn.Module with local_logits(x) -> [B, C, h, w], a Geometry in .geometry and an int .num_classes")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: its factory {who} returned a {type(model).__name__}, not a model; {expected}")
    if not isinstance(model, BagModel) and not callable(getattr(model, "local_logits", None)):
        raise TypeError(f"model {name!r}: its factory {who} returned a {type(model).__name__} without local_logits; {expected}")
    geometry = getattr(model, "geometry", None)
    inferred = callable(getattr(model, "infer_geometry_at", None))  # bagcert.wrap_model: inferred per image size
    if not isinstance(geometry, Geometry) and not inferred:
        got = "no geometry" if geometry is None else f"geometry of type {type(geometry).__name__}"
        raise TypeError(f"model {name!r}: its factory {who} returned a {type(model).__name__} with {got}; set "
                        "self.geometry = bagcert.Geometry.from_layers([(kernel, stride, padding), ...]) in its __init__, "
                        "or return bagcert.wrap_model(module, ...), which infers it")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise TypeError(f"model {name!r}: its factory {who} returned a {type(model).__name__} whose num_classes is "
                        f"{num_classes!r}; expected an int >= 2")


def create_model(name: str, num_classes: int | None = None, **kwargs) -> BagModel:
    """Build a registered model. Keyword arguments override the preset's defaults.

    A name that is not registered loads the installed plugins (entry point group ``bagcert.models``) first.

    Returns:
        the model, with ``model.config = {"name": name, "kwargs": {...}}`` (the preset's defaults updated by the
        arguments), which :func:`bagcert.save_checkpoint` records.

    Raises:
        ValueError: an unknown name (with close matches and how to register one).
        PluginError (a ValueError): an installed plugin failed to load.
        TypeError: the factory returned something bagcert cannot certify (not a BagModel, no geometry, ...).
        Whatever the factory raises for bad arguments.
    """
    if not _is_registered(name):
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (bagcert.list_models() lists all {len(_REGISTRY)}; a model of your own is "
            f"registered by a --model-module FILE or an installed plugin, docs/own_model_plugin.md)"
        )
    factory, defaults, _ = _REGISTRY[name]
    args = dict(defaults)
    args.update(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = factory(**args)
    _check_built(name, factory, model)
    model.config = {"name": name, "kwargs": {k: v for k, v in args.items()}}
    return model


def to_dense(model: BagModel) -> BagModel:
    """The dense (a trous) evaluation of a strided :class:`CifarBagNet`: the same weights, every pixel a location.

    The strided convolutions run at stride 1 and every later spatial convolution is dilated by the stride it
    followed (the "a trous" algorithm, Holschneider et al. 1989; Shensa, IEEE Trans. Signal Processing 1992), so
    the returned model's local logits [B, C, H', W'] hold the strided model's [B, C, h, w] at every ``stride``-th
    location (``dense[..., ::s, ::s] == strided``) and the locations in between. Its geometry has stride 1 and the
    same receptive field: a 5x5 patch reaches 81 of the 1,024 dense locations of a 32 px image where it reaches
    up to 25 of the 256 strided ones, and the vote margin is counted over four times as many locations.
    Costs about ``stride**2`` times the compute of the strided forward pass after the stem.

    Args:
        model: a bagcert model built from the registry with stride 2, 4 or 8 (``model.config`` names it), in
            either mode; a model that is already dense is returned as a new copy.

    Returns:
        a new model in eval mode on the same device, ``config["kwargs"]["dense"] = True``, weights copied.

    Raises:
        TypeError: ``model`` is not a :class:`CifarBagNet` (the BagNets of ``bagnet9/17/33`` are not converted).
        ValueError: the model has stride 1 (it already is dense).
    """
    if not isinstance(model, CifarBagNet) or not getattr(model, "config", None):
        raise TypeError(f"to_dense converts registry CifarBagNet models (cifar_bagnet*, image_bagnet*), got "
                        f"{type(model).__name__}")
    kwargs = {**model.config["kwargs"], "dense": True}
    dense = create_model(model.config["name"], **kwargs)
    dense.load_state_dict(model.state_dict())
    dense.aggregation = model.aggregation
    p = next(model.parameters())
    return dense.to(device=p.device).eval()


# --- ImageNet-sized BagNets (stride 8, unpadded) ---------------------------------------------
for _rf in (9, 17, 33):
    register_model(f"bagnet{_rf}", BagNet, f"BagNet-{_rf} (Brendel & Bethge 2019)", receptive_field=_rf, num_classes=1000)
    register_model(
        f"bagnet{_rf}_w025", BagNet, f"BagNet-{_rf} at a quarter of the width (CPU-sized)", receptive_field=_rf, num_classes=1000, width=0.25
    )

# --- CIFAR-sized backbones ----------------------------------------------------------------------
register_model("cifar_bagnet", CifarBagNet, "configurable CIFAR backbone (receptive_field, stride, padding, width, depth)")
for _rf in (5, 7, 9, 11, 13, 17):
    register_model(f"cifar_bagnet{_rf}", CifarBagNet, f"CIFAR backbone, receptive field {_rf}, stride 1", receptive_field=_rf)
    register_model(
        f"cifar_bagnet{_rf}_s2", CifarBagNet, f"CIFAR backbone, receptive field {_rf}, stride 2", receptive_field=_rf, stride=2
    )

# --- CPU-sized ImageNet-style backbones (stride 8, same padding: 16x16 locations at 128 px) ------
for _rf in (17, 33):
    register_model(
        f"image_bagnet{_rf}_s8", CifarBagNet,
        f"CPU-sized ImageNet-style backbone, receptive field {_rf}, stride 8 (ImageNet normalisation)",
        receptive_field=_rf, stride=8, width=192, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )

# --- standard backbones as region scorers (docs/backbones.md) ------------------------------------
register_model(
    "resnet_bagnet", resnet_bagnet,
    "a torchvision ResNet (arch=resnet18..152, random weights) with the BagNet recipe (keep, stem, maxpool, layer_strides)",
    arch="resnet18", num_classes=10, keep=1, stem="imagenet", maxpool=True, layer_strides=None, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, aggregation="votes",
)
register_model(
    "cifar_vit", WindowViT,
    "windowed ViT (PatchCURE's SRF ViT): attention inside windows of tokens, one location per window "
    "(patch_size, window, width, depth, heads)",
)
for _p, _w in ((2, 2), (4, 2), (4, (8, 1))):
    _wname = f"{_w[0]}x{_w[1]}" if isinstance(_w, tuple) else str(_w)
    _rf = f"{_w[0] * _p}x{_w[1] * _p}" if isinstance(_w, tuple) else f"{_w * _p}"
    register_model(
        f"cifar_vit_p{_p}_w{_wname}", WindowViT,
        f"windowed ViT, {_p} px tokens, windows of {_wname} tokens: receptive field = stride = {_rf} px",
        patch_size=_p, window=list(_w) if isinstance(_w, tuple) else _w,
    )
register_model(
    "image_vit_p16_w14x2", WindowViT,
    "windowed ViT at 224 px, PatchCURE's ViT-SRF 14x2 geometry (16 px tokens, windows of 14x2 tokens: 224x32 px "
    "columns, 1x7 locations) at ViT-Ti size (width 192, depth 12, heads 3; ImageNet normalisation)",
    patch_size=16, window=[14, 2], width=192, depth=12, heads=3, mlp_ratio=4.0, num_classes=1000,
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
)
