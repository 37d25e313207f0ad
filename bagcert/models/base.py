"""Base class shared by every bagcert model: pixel-space contract, geometry, aggregation."""

from __future__ import annotations

import torch
from torch import nn

from ..aggregation import get_aggregation
from ..geometry import Geometry

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputError(ValueError):
    """Raised for images that break the model's input contract."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else a ValueError naming ``name``."""
    if type(value) is not int or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _range_hint(lo: float, hi: float) -> str:
    """What values outside [0, 1] most likely mean, as advice (empty when there is no likely cause)."""
    if lo < 0.0:
        if lo >= -0.01 and hi <= 1.01:
            return " (slightly outside, e.g. interpolation overshoot: clamp with x.clamp(0, 1))"
        return (
            " (negative values: these look already normalised with a mean/std; the model normalises internally, "
            "so pass the images in [0, 1] without Normalize)"
        )
    if hi <= 1.01:
        return " (slightly above 1, e.g. interpolation overshoot: clamp with x.clamp(0, 1))"
    if hi <= 255.0:
        return " (these look like 0-255 images: divide by 255)"
    return ""


# torch.nn layer families that compute the same in training and eval mode (MultiheadAttention, in
# ``activation``, applies dropout in training mode and is excluded by name)
_MODE_FREE = {f"torch.nn.modules.{m}" for m in ("conv", "linear", "activation", "pooling", "padding", "container",
                                                 "flatten", "pixelshuffle", "normalization", "sparse", "channelshuffle",
                                                 "fold", "distance")}


def in_training_mode(model) -> bool:
    """Whether ``model`` or a submodule whose computation depends on the mode is in training mode.

    A certificate holds for a deterministic prediction: a submodule left in training mode (dropout draws a new
    mask per forward pass, BatchNorm uses the batch's statistics, a custom module may branch on
    ``self.training``) makes the patched image's prediction differ from the one that was certified, so the
    certifiers refuse it. torch.nn layers that ignore the mode (convolutions, linear layers, activations,
    pooling, padding, containers, LayerNorm / GroupNorm) are not counted: a freshly built head may stay as it is.
    ``model.eval()`` clears every flag."""
    if getattr(model, "training", False):
        return True
    if not isinstance(model, nn.Module):
        return False
    return any(m.training and not (type(m).__module__ in _MODE_FREE and not isinstance(m, nn.MultiheadAttention))
               for m in model.modules())


def check_images(x: torch.Tensor, min_size: int | None = None) -> None:
    """Validate a batch of images against the pixel-space contract: floating-point [B, 3, H, W] in [0, 1].

    Any floating dtype passes (models convert it to their weight dtype, see :meth:`BagModel.local_logits`).

    Raises:
        InputError (a ValueError): not a tensor, not [B, 3, H, W], not floating point (uint8: divide by 255),
            empty, NaN/Inf, values outside [0, 1] (with a hint: 0-255 images, already mean/std-normalised
            images, slight interpolation overshoot), or smaller than ``min_size``.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise InputError(
            f"images must have 3 channels (RGB) in dimension 1, got {x.shape[1]} (shape {tuple(x.shape)}); "
            "grey images need to be repeated to 3 channels, and channels-last arrays permuted to [B, 3, H, W]"
        )
    if not x.is_floating_point():
        hint = "convert uint8 images with x.float() / 255" if x.dtype == torch.uint8 else "convert them with x.float()"
        raise InputError(f"images must be floating point in [0, 1], got dtype {x.dtype}; {hint}")
    if x.numel() == 0:
        raise InputError(f"empty image batch {tuple(x.shape)}; expected [B, 3, H, W] with B, H, W >= 1")
    if not torch.isfinite(x).all():
        raise InputError("images contain NaN or Inf values; expected finite values in [0, 1]")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"image values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]{_range_hint(lo, hi)}")
    if min_size is not None and min(x.shape[-2:]) < min_size:
        raise InputError(
            f"images of size {tuple(x.shape[-2:])} are smaller than the model's receptive field / minimum input "
            f"size {min_size}: no location would see a full window"
        )


class BagModel(nn.Module):
    """A classifier whose class scores aggregate per-location logits of a small-receptive-field network.

    Subclasses implement :meth:`features_to_logits` on normalised input and set ``self.geometry``; the
    certification paths check that geometry against the computation (:func:`bagcert.verify_geometry`) unless the
    model is a built-in registry model, and :func:`bagcert.wrap_model` wraps a plain module instead.
    Public surface:

    * ``local_logits(x)``: float images [B, 3, H, W] in [0, 1] -> [B, C, h, w].
    * ``forward(x)``: -> [B, C] class scores of the model's aggregation (vote counts by default).
    * ``geometry``: :class:`bagcert.geometry.Geometry` (receptive field, stride, padding).
    * ``config``: the registry name and keyword arguments that rebuild the architecture.
    """

    def __init__(self, num_classes: int, mean, std, aggregation: str = "votes", check_inputs: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.aggregation = get_aggregation(aggregation).name
        self.check_inputs = check_inputs
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.geometry: Geometry | None = None
        self.config: dict = {}

    # -- to implement -------------------------------------------------------------------
    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------
    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location class logits.

        Args:
            x: floating-point images [B, 3, H, W] in [0, 1], unnormalised (the model applies its mean/std).
                Images of another floating dtype than the model's weights (float32 unless the model was cast)
                are converted to it first: float64 is rounded to float32, so the result is exactly that of
                ``x.float()``; float16 / bfloat16 are widened exactly.

        Returns:
            [B, num_classes, h, w] logits, ``(h, w) = self.grid_size(H, W)``.

        Raises:
            InputError (a ValueError): with ``check_inputs`` (the default), images that break the contract
                (see :func:`check_images`).
        """
        if self.check_inputs:
            check_images(x, self.geometry.min_input_size())
        if x.is_floating_point() and x.dtype != self.mean.dtype:
            x = x.to(self.mean.dtype)
        x = (x - self.mean) / self.std
        return self.features_to_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [B, num_classes] of the model's aggregation (vote counts by default) for images
        [B, 3, H, W] in [0, 1]; input contract and dtype conversion as :meth:`local_logits`."""
        return get_aggregation(self.aggregation).class_scores(self.local_logits(x))

    def mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Average of the local logits (the classic BagNet pooled logits)."""
        return self.local_logits(x).mean(dim=(2, 3))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.geometry.grid_size(height, width)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"num_classes={self.num_classes}, aggregation={self.aggregation!r}, receptive_field={g.receptive_field[0]}, "
            f"stride={g.stride[0]}, padding={g.padding[0]}"
        )
