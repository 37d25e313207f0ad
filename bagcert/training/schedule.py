"""The learning rate of every step (linear warm-up, then a cosine, one-cycle or constant schedule, with the linear
batch-size rule of :func:`base_lr`) and the optimiser (AdamW, Adam or SGD; no weight decay on biases and norms).

The learning rate is a pure function of the global step (and, for a re-planned time budget, of the re-plan's
anchor), so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

__all__ = ["base_lr"]


def base_lr(cfg) -> float:
    """The peak learning rate of ``cfg`` (a :class:`~bagcert.training.TrainConfig`): ``cfg.lr``, or with
    ``cfg.lr_scale_batch = N`` the linear scaling rule ``cfg.lr * cfg.batch_size * cfg.grad_accum / N``.
    ``batch_size`` is already the global batch over all processes, so ``batch_size * grad_accum`` is what one
    optimiser step sees."""
    if getattr(cfg, "lr_scale_batch", None) is None:
        return cfg.lr
    return cfg.lr * cfg.batch_size * cfg.grad_accum / cfg.lr_scale_batch


def _progress(step: int, total: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
    """Fraction of the decay phase done at ``step``: 0 at the end of the warm-up, 1 at ``total``.

    ``anchor = (step_a, t_a)`` comes from a re-planned time-budgeted run: its progress was ``t_a`` at
    ``step_a`` under the old total, and from there it runs linearly to 1 at the new ``total``, so the
    learning rate stays continuous when the total changes.
    """
    if anchor is not None and step >= anchor[0]:
        step_a, t_a = anchor
        return t_a + (1.0 - t_a) * (step - step_a) / max(1, total - step_a)
    return (step - warmup) / max(1, total - warmup)


def _lr_at(cfg, step: int, total: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
    """The learning rate of ``step``: linear warm-up to :func:`base_lr`, then the schedule's decay to ``total``."""
    lr = base_lr(cfg)
    if cfg.schedule == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    t = _progress(step, total, warmup, anchor)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "onecycle":
        return lr * max(0.0, 1 - t)
    raise ValueError(f"schedule must be cosine, onecycle or constant, got {cfg.schedule!r}")


def _make_optimizer(cfg: TrainConfig, model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if getattr(cfg, "fused_optimizer", False) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")
