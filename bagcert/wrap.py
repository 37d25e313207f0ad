"""Certify a model that is not in the registry: :func:`wrap_model` turns a ``torch.nn.Module`` that maps
normalised images [B, 3, H, W] to local logits [B, C, h, w] into a certifiable :class:`~bagcert.models.BagModel`.

The wrapper applies the mean/std normalisation inside (so it takes [0, 1] images like every bagcert model),
aggregates the local logits (votes by default) and carries a geometry that is never taken on trust: without a
declared geometry it is inferred from the module's computation (:func:`bagcert.infer_geometry`) for every
image size it sees; a declared geometry is verified against the inferred one before any certificate
(:func:`bagcert.verify_geometry`).
"""

from __future__ import annotations

import torch
from torch import nn

from .geometry import Geometry, normalize_image_size
from .geometry_inference import _fingerprint, infer_geometry, verify_geometry
from .models.base import BagModel, check_images

__all__ = ["WrappedBagModel", "wrap_model"]


class _Normalised(nn.Module):
    """``x -> net((x - mean) / std)``: the wrapped computation on [0, 1] images, as one traceable module."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.mean, self.std = mean, std  # plain attributes: constants of the trace
        self._bagcert_name = type(net).__name__  # what error messages call the module

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class WrappedBagModel(BagModel):
    """A user module as a bagcert model (built by :func:`wrap_model`).

    Attributes:
        net: the wrapped module (normalised images [B, 3, H, W] -> local logits [B, C, h, w]).
        declared_geometry: the geometry given to :func:`wrap_model`, or None (inferred per image size).
        geometry: the declared geometry, or the one inferred for the last image size seen (None before the first).
        num_classes: as given, or read off the first local-logit map (None until then).
    """

    def __init__(self, module: nn.Module, mean, std, geometry: Geometry | None = None, num_classes: int | None = None,
                 aggregation: str = "votes"):
        super().__init__(2 if num_classes is None else num_classes, mean, std, aggregation)
        self.num_classes = num_classes
        self.net = module
        self.declared_geometry = geometry
        self.geometry = geometry
        self._inferred: dict = {}
        self.config = {}

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def infer_geometry_at(self, image_size) -> Geometry:
        """The geometry inferred from the wrapped module on ``image_size`` (H, W) images (cached per size and
        module fingerprint); also becomes ``self.geometry``. Raises :class:`bagcert.GeometryError` when it cannot
        be established."""
        H, W = normalize_image_size(image_size)
        key = ((H, W), _fingerprint(self.net))
        geometry = self._inferred.get(key)
        if geometry is None:
            from .inference import chunk_size

            # traced also at the batch size bagcert.certify evaluates this model at (its fixed chunk)
            geometry = infer_geometry(_Normalised(self.net, self.mean, self.std), (H, W),
                                      batch_sizes=(chunk_size(self, (H, W)),))
            if len(self._inferred) >= 16:
                self._inferred.clear()
            self._inferred[key] = geometry
        if self.declared_geometry is None:
            self.geometry = geometry
        return geometry

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location class logits [B, C, h, w] of float images [B, 3, H, W] in [0, 1] (see
        :meth:`BagModel.local_logits`); without a declared geometry, the geometry of this image size is
        inferred first (once per size)."""
        if self.check_inputs:
            check_images(x)
        if self.declared_geometry is None and isinstance(x, torch.Tensor) and x.dim() == 4:
            self.infer_geometry_at(tuple(x.shape[-2:]))
        if x.is_floating_point() and x.dtype != self.mean.dtype:
            x = x.to(self.mean.dtype)
        z = self.features_to_logits((x - self.mean) / self.std)
        if self.num_classes is None and isinstance(z, torch.Tensor) and z.dim() == 4:
            self.num_classes = int(z.shape[1])
        return z

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        declared = self.declared_geometry
        if declared is not None and declared.knows_grid(height, width):
            return declared.grid_size(height, width)
        return self.infer_geometry_at((height, width)).grid[1]

    def extra_repr(self) -> str:
        g = self.geometry
        if g is None:
            return f"num_classes={self.num_classes}, aggregation={self.aggregation!r}, geometry inferred per image size"
        return (f"num_classes={self.num_classes}, aggregation={self.aggregation!r}, receptive_field={g.receptive_field}, "
                f"stride={g.stride}, padding={g.padding}")


def wrap_model(module: nn.Module, *, mean, std, geometry: Geometry | None = None, num_classes: int | None = None,
               aggregation: str = "votes", image_size=None) -> WrappedBagModel:
    """Make ``module`` certifiable: a :class:`WrappedBagModel` with ``local_logits``, ``geometry`` and ``forward``.

    Args:
        module: maps normalised float images [B, 3, H, W] to local logits [B, C, h, w] (C >= 2), each location
            seeing a bounded window of the image (convolutions, pooling, residual sums...; see
            :func:`bagcert.infer_geometry` for what can be analysed).
        mean, std: 3 per-channel values; the wrapper computes ``(x - mean) / std`` of [0, 1] images itself.
        geometry: a declared :class:`~bagcert.geometry.Geometry`, or None to infer it from the computation for
            every image size. A declared one is verified before certifying (refused if it does not cover the
            true receptive field, a warning if it is larger).
        num_classes: C, or None to read it off the first local-logit map (or off ``image_size``'s trace).
        aggregation: ``"votes"`` (default), ``"majority"`` or ``"clipped"``.
        image_size: optional (H, W): infer (or verify) the geometry now, so that errors show up here.

    Returns:
        A :class:`WrappedBagModel` in the train/eval mode of ``module``; ``model(x)`` gives class scores [B, C]
        (vote counts for votes), ``model.local_logits(x)`` the map [B, C, h, w] on [0, 1] images.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``; ``geometry`` is not a Geometry.
        ValueError: ``mean`` / ``std`` are not 3 values (``std`` > 0); ``num_classes`` below 2; an unknown
            aggregation; with ``image_size``, a :class:`bagcert.GeometryError` when the geometry cannot be
            established or the declared one does not cover the true one.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap_model needs a torch.nn.Module, got {type(module).__name__}")
    if geometry is not None and not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a bagcert.Geometry or None, got {type(geometry).__name__}")
    for name, value in (("mean", mean), ("std", std)):
        try:
            t = torch.as_tensor(value, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.numel() != 3 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be 3 per-channel values (R, G, B), got {value!r}")
        if name == "std" and bool((t <= 0).any()):
            raise ValueError(f"std must be positive, got {value!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
    mean = tuple(float(v) for v in torch.as_tensor(mean, dtype=torch.float32).flatten())
    std = tuple(float(v) for v in torch.as_tensor(std, dtype=torch.float32).flatten())
    p = next(iter(list(module.parameters()) + list(module.buffers())), None)
    model = WrappedBagModel(module, mean, std, geometry, num_classes, aggregation)
    if p is not None:
        model.to(device=p.device)
    model.train(module.training)
    if image_size is not None:
        model.infer_geometry_at(image_size)
        if model.num_classes is None:
            model.num_classes = int(inferred_classes(model, image_size))
        if geometry is not None:
            verify_geometry(model, image_size)
    return model


def inferred_classes(model: WrappedBagModel, image_size) -> int:
    """C of the wrapped module's local-logit map on ``image_size`` images (one forward pass of one blank image)."""
    H, W = normalize_image_size(image_size)
    p = next(iter(list(model.parameters()) + list(model.buffers())))
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            z = model.features_to_logits(torch.zeros(1, 3, H, W, device=p.device, dtype=model.mean.dtype))
        finally:
            model.train(was)
    return int(z.shape[1])
