"""The exponential moving average of the weights (``ema``): its warmed-up decay and the fused update."""

from __future__ import annotations

import torch

__all__ = ["ema_decay", "ema_update"]


def ema_decay(decay: float, step: int) -> float:
    """EMA decay used after optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

    The warm-up keeps the average close to the model early in training (with a fixed 0.999, after 780
    steps 46 % of the average would still be the random initialisation, and evaluations during training
    would show it); from about ``9 / (1 - decay)`` steps on, the decay is ``decay``.
    """
    return min(float(decay), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for floating-point parameters and buffers; other
    buffers (e.g. BatchNorm's step counter) are copied.

    One fused ``torch._foreach_lerp_`` over all floating-point tensors (``ema + (1 - decay) * (model - ema)``)
    instead of two kernels per tensor.
    """
    floats_e, floats_m = [], []
    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
        if pe.dtype.is_floating_point:
            floats_e.append(pe)
            floats_m.append(pm.detach())
        else:
            pe.copy_(pm)
    if floats_e:
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - decay)
