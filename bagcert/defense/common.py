"""Small helpers shared by :mod:`bagcert.defense` and :mod:`bagcert.analysis`.

* The *logits function* of a model is what gradients are taken through: ``model.mean_logits`` for
  bagcert models (the mean of the local logits, differentiable; ``model(x)`` returns vote counts,
  which have no useful gradient), the callable itself for anything else.
* The *prediction* of a model is ``argmax`` of ``model(x)`` (ties to the lower class index): the
  vote prediction for bagcert models, the logits' argmax for any other classifier. With
  ``prediction="logits"`` it is the argmax of the logits function instead.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch

__all__ = ["logits_fn_of", "predict_fn_of", "as_float_images", "eval_mode", "check_labels"]


def logits_fn_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable logits of ``model``: ``model.mean_logits`` if it has one, else ``model``."""
    fn = getattr(model, "mean_logits", None)
    if not callable(fn):
        if not callable(model):
            raise TypeError(f"model must be a bagcert model or a callable returning logits, got {type(model).__name__}")
        fn = model

    @functools.wraps(fn)
    def logits(x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # bagcert's input check reads min/max of inputs that require grad (harmless: read only)
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            return fn(x)

    return logits


def predict_fn_of(model, prediction: str = "model") -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> long [B]`` predictions: argmax of ``model(x)`` (``"model"``) or of its logits (``"logits"``)."""
    if prediction == "model":
        scorer = model
    elif prediction == "logits":
        scorer = logits_fn_of(model)
    else:
        raise ValueError(f"prediction must be 'model' or 'logits', got {prediction!r}")

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return scorer(x).argmax(dim=1)  # first maximum: ties to the lower class index

    return predict


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images are returned as they are (not copied)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return x


def check_labels(labels, n: int, num_classes: int | None = None) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long().reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"got {n} images but {labels.numel()} labels")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {int(labels.max())}")
    return labels


@contextlib.contextmanager
def eval_mode(*models):
    """Put every ``torch.nn.Module`` among ``models`` in eval mode; restore each one's mode on exit."""
    modules = [m for m in models if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
