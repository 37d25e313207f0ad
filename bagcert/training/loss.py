"""The training loss of a run: the bagcert loss (:class:`bagcert.losses.BagCertLoss`, its margin weight warmed up)
or cross-entropy, and the ``compile_step`` variant that compiles the forward pass and the loss together."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import BagCertLoss
from .config import TrainConfig


def _loss_function(cfg: TrainConfig, model, peer, margin_warm: int):
    """``loss_of(step) -> (output, y) -> (loss, stats)``: the bagcert loss (margin weight warmed up over
    ``margin_warm`` steps) or cross-entropy on the mean logits (a peer: on its logits)."""
    if cfg.loss == "ce":
        def loss_of(step):
            def f(z, y):
                logits = z.float() if peer is not None else z.float().mean(dim=(2, 3))
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                return loss, {"loss": loss.detach()}
            return f
        return loss_of
    if cfg.loss == "masking":
        from ..losses_masking import masking_loss

        loss_fn = masking_loss(cfg, model.geometry)
    else:
        loss_fn = BagCertLoss(
            model.geometry, (cfg.image_size, cfg.image_size), cfg.patch_sizes, tau=cfg.tau, kappa=cfg.kappa,
            margin_weight=cfg.margin_weight, bce_weight=cfg.bce_weight, ce_weight=cfg.ce_weight,
            label_smoothing=cfg.label_smoothing, bce_pos_weight=cfg.bce_pos_weight, margin_reduce=cfg.margin_reduce,
        )

    def loss_of(step):
        mw = cfg.margin_weight * min(1.0, step / margin_warm)

        def f(z, y):
            loss, stats = loss_fn(z, y, margin_weight=mw)
            stats["robust_train"] = (stats.pop("margin") > 0).float().mean()
            return loss, stats
        return f
    return loss_of


def _identity(x):
    return x


def _compiled_step_loss(cfg: TrainConfig, net, model, peer, margin_warm: int):
    """``loss_of(step) -> (x, y) -> (loss, stats)`` that runs the forward pass of ``net`` (bf16 autocast with
    ``cfg.amp``) and the loss of :func:`_loss_function` as one ``torch.compile``d function, for ``train_step`` with
    the identity as its forward (``cfg.compile_step``).

    The bagcert loss's margin weight (warmed up over ``margin_warm`` steps) is passed as a 0-d tensor, so that its
    changing value does not make dynamo recompile at every step; with a tensor weight the margin term is always
    computed (weight 0 adds 0). The forward pass and the loss are the same operations as without ``compile_step``;
    inductor's fused kernels round differently in the last bits, as with ``cfg.compile``.
    """
    device_type = next(model.parameters()).device.type
    if cfg.loss == "ce":
        inner = _loss_function(cfg, model, peer, margin_warm)(0)

        def ce_step(x, y):
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.amp):
                z = net(x)
            return inner(z, y)

        compiled = torch.compile(ce_step)
        return lambda step: compiled
    loss_fn = BagCertLoss(
        model.geometry, (cfg.image_size, cfg.image_size), cfg.patch_sizes, tau=cfg.tau, kappa=cfg.kappa,
        margin_weight=cfg.margin_weight, bce_weight=cfg.bce_weight, ce_weight=cfg.ce_weight,
        label_smoothing=cfg.label_smoothing, bce_pos_weight=cfg.bce_pos_weight, margin_reduce=cfg.margin_reduce,
    )

    def bagcert_step(x, y, mw):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.amp):
            z = net(x)
        loss, stats = loss_fn(z, y, margin_weight=mw)
        stats["robust_train"] = (stats.pop("margin") > 0).float().mean()
        return loss, stats

    compiled = torch.compile(bagcert_step)

    def loss_of(step):
        mw = torch.tensor(cfg.margin_weight * min(1.0, step / margin_warm), dtype=torch.float32)
        return lambda x, y: compiled(x, y, mw.to(x.device))
    return loss_of
