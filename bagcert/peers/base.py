"""Common interface of the peer certifiers.

Every certifier is an object with

* ``name``: a short identifier (also written into ``CertResult.aggregation``),
* ``certify(model_or_fn, images, labels, patch_size) -> CertResult``,
* ``predict(model_or_fn, images, patch_size=None) -> long [N]``: the defended prediction,
* ``forward_passes_per_image(image_size, patch_size) -> int``: network evaluations that
  ``certify`` spends on one image.

``CertResult.certified`` always means: no patch of ``patch_size`` at any position fully inside the
image can change the defended prediction. ``margin`` is > 0 exactly for certified samples (its unit
depends on the method, see each class); ``worst_position`` is the top-left pixel (row, col) of the
worst patch position where the method's certificate is position-aware, zeros otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..certification import CertResult, _check_labels
from ..geometry import parse_patch_size
from ..models.base import check_images, in_training_mode

__all__ = ["PeerCertifier", "as_classifier", "check_images_for_peer", "check_labels", "make_result", "batched_predictions"]


class PeerCertifier:
    """Base class: subclasses set ``name`` and implement ``certify``, ``predict`` and
    ``forward_passes_per_image``."""

    name: str = "peer"

    def certify(self, model_or_fn, images: torch.Tensor, labels, patch_size) -> CertResult:  # pragma: no cover
        raise NotImplementedError

    def predict(self, model_or_fn, images: torch.Tensor, patch_size=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_passes_per_image(self, image_size, patch_size) -> int:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def as_classifier(model_or_fn) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a callable ``x -> logits [B, C]``; refuse a module in training mode."""
    if not callable(model_or_fn):
        raise TypeError(f"expected a model or a callable x -> logits, got {type(model_or_fn).__name__}")
    if isinstance(model_or_fn, nn.Module) and in_training_mode(model_or_fn):
        raise RuntimeError(
            "model (or one of its submodules) is in training mode (batch-norm statistics would depend on the batch); call model.eval() first"
        )
    return model_or_fn


def check_images_for_peer(images: torch.Tensor) -> None:
    check_images(images)


def check_labels(labels, n: int, device) -> torch.Tensor | None:
    """Labels as long [N] (or None); class-range checks happen once the number of classes is known."""
    return _check_labels(labels, n, None, device)


def make_result(prediction, labels, certified, margin, patch_size, name, worst_position=None) -> CertResult:
    n = prediction.numel()
    if labels is not None:
        correct = prediction == labels
        label_out = labels
    else:
        correct = torch.zeros(n, dtype=torch.bool, device=prediction.device)
        label_out = torch.full((n,), -1, dtype=torch.long, device=prediction.device)
    if worst_position is None:
        worst_position = torch.zeros(n, 2, dtype=torch.long, device=prediction.device)
    return CertResult(
        prediction=prediction,
        label=label_out,
        correct=correct,
        certified=certified,
        margin=margin,
        worst_position=worst_position,
        patch_size=parse_patch_size(patch_size),
        aggregation=name,
    )


def batched_predictions(fn, n_items: int, build: Callable[[torch.Tensor], torch.Tensor], batch_size: int, device) -> torch.Tensor:
    """Evaluate ``fn`` on ``n_items`` inputs built on the fly, ``batch_size`` at a time.

    ``build(index)`` receives a long tensor of flat item indices and returns the input batch.
    Returns ``(classes, num_classes)``: the argmax class (ties to the lower index) of every item,
    long [n_items], and the number of logits the classifier returned.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = torch.empty(n_items, dtype=torch.long, device=device)
    num_classes = None
    for start in range(0, n_items, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_items), device=device)
        logits = fn(build(idx))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != idx.numel():
            raise ValueError(
                f"the base classifier must return logits [B, C] for a batch of {idx.numel()}, got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
            )
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"the base classifier returned {logits.shape[1]} logits after {num_classes}")
        num_classes = int(logits.shape[1])
        out[start : start + idx.numel()] = logits.argmax(dim=1)  # first maximum: ties to the lower class
    return out, num_classes
