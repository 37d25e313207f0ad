"""The threat model every empirical patch attack is held to, enforced in one place.

Threat model (the one the certificate covers): the attacker replaces the pixels of ONE axis-aligned
rectangle of ``patch_size = (height, width)`` pixels, lying fully inside the image, with arbitrary values in
[0, 1]; every other pixel is untouched. An attack succeeds on an image when the defended model's prediction
(``model(x_adv).argmax(1)``, ties to the lower class index) differs from the label.

:class:`PatchAttack.__call__` enforces this around every subclass's :meth:`PatchAttack._attack`, so no attack
can report a success that is outside the threat model or that the real model does not confirm:

1. the model is put in eval mode and its parameters' ``requires_grad`` is switched off for the attack; every
   module's train/eval flag and every parameter's ``requires_grad`` are restored afterwards, also when the
   attack raises;
2. images the model already misclassifies are not attacked (they count as broken, unchanged);
3. the returned images are recomposed as ``x (1 - M) + clamp(x_adv, 0, 1) M`` with the attack's binary mask M
   (written as a ``where`` so that pixels outside M are bit-identical to the input even if x_adv holds NaN);
4. a mask whose bounding box does not fit in ``patch_size`` is refused (:class:`ThreatModelError`) for attacks
   that claim to stay in the threat model (``enforces_patch_size = True``); for others (ImageNet-Patch: a
   rotated 50 px patch) the per-image flag ``in_threat_model`` records whether it fits;
5. success is recomputed with the real model, in eval mode, without gradients, on the recomposed images.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..certification import _check_labels
from ..geometry import parse_patch_size
from ..models.base import check_images, check_int  # noqa: F401 (check_int: used by the attacks)

__all__ = [
    "AttackResult",
    "PatchAttack",
    "check_choice",
    "check_int",
    "check_positive",
    "inputs_unchecked",
    "ThreatModelError",
    "mask_bounding_boxes",
    "model_predict",
    "rectangle_masks",
    "restore_model_state",
]


class ThreatModelError(RuntimeError):
    """An attack produced adversarial images outside the threat model it claims (a bug in the attack)."""


@dataclass
class AttackResult:
    """What an attack returns, per image (N images).

    Attributes:
        attack: the attack's name.
        adv_images: float [N, 3, H, W] in [0, 1]; equal to the input outside ``masks``.
        masks: float [N, 1, H, W] in {0, 1}: the pixels the attack may have changed (all zero for images
            that were not attacked because the model already misclassified them).
        positions: long [N, 2]: (top, left) pixel of the mask's bounding box; (-1, -1) for an empty mask.
        success: bool [N]: ``model(adv_images).argmax(1) != labels`` recomputed with the real model.
        predictions: long [N]: the real model's prediction on ``adv_images``.
        labels: long [N].
        clean_predictions: long [N]: the real model's prediction on the inputs.
        in_threat_model: bool [N]: the mask fits in a ``patch_size`` rectangle (always True for attacks that
            enforce the patch size; an empty mask fits).
        patch_size: (height, width) of the threat model, or None when none was given.
        info: attack-specific extras (settings, per-patch rates, ...), JSON-serialisable.
    """

    attack: str
    adv_images: torch.Tensor
    masks: torch.Tensor
    positions: torch.Tensor
    success: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor
    clean_predictions: torch.Tensor
    in_threat_model: torch.Tensor
    patch_size: tuple | None
    info: dict = field(default_factory=dict)

    @property
    def robust(self) -> torch.Tensor:
        """bool [N]: still correctly classified after the attack."""
        return ~self.success

    @property
    def num_samples(self) -> int:
        return int(self.success.numel())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.num_samples else float("nan")

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_predictions == self.labels).float().mean()) if self.num_samples else float("nan")

    def __repr__(self) -> str:
        ps = "x".join(map(str, self.patch_size)) if self.patch_size else "none"
        return (
            f"AttackResult({self.attack!r}, patch={ps}, n={self.num_samples}, clean={self.clean_accuracy:.4f}, "
            f"robust={self.robust_accuracy:.4f})"
        )


# ----------------------------------------------------------------------------------------------- helpers


def check_positive(name: str, value) -> float:
    """``float(value)`` if it is a finite real number > 0; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


@contextlib.contextmanager
def restore_model_state(model):
    """Eval mode and frozen parameters inside the block; every module's ``training`` flag and every parameter's
    ``requires_grad`` restored on exit, also on exceptions."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def inputs_unchecked(model):
    """Switch off the models' per-call input validation (``check_inputs``) inside the block, restoring it after.

    For attack inner loops only: their images are built in [0, 1] by construction, the user's images were
    validated once, and the validation would read values out of tensors that require grad at every step."""
    flags = [(m, m.check_inputs) for m in model.modules() if hasattr(m, "check_inputs")]
    try:
        for m, _ in flags:
            m.check_inputs = False
        yield model
    finally:
        for m, flag in flags:
            m.check_inputs = flag


@torch.no_grad()
def model_predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The defended prediction ``model(x).argmax(1)`` (ties to the lower class index), in batches, no grad.

    A bagcert model in eval mode is evaluated exactly as :func:`bagcert.certify` evaluates it
    (:func:`bagcert.inference.evaluate_local_logits`: the inference copy, fixed chunks), so that an attack is
    judged by the same function whose prediction was certified, bit for bit; anything else through ``model(x)``.
    """
    if hasattr(model, "local_logits") and hasattr(model, "aggregation") and not getattr(model, "training", True):
        from ..aggregation import get_aggregation
        from ..inference import evaluate_local_logits

        agg = get_aggregation(model.aggregation)
        with torch.no_grad():
            out = [agg.class_scores(evaluate_local_logits(model, images[i : i + batch_size])).argmax(1)
                   for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)
    out = [model(images[i : i + batch_size]).argmax(1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)


def rectangle_masks(image_size, patch_size, positions: torch.Tensor, device=None) -> torch.Tensor:
    """Float masks [M, 1, H, W] in {0, 1} of ``patch_size`` rectangles at ``positions`` (long [M, 2], top-left)."""
    H, W = image_size
    ph, pw = parse_patch_size(patch_size)
    positions = positions.to(device if device is not None else positions.device)
    rows = torch.arange(H, device=positions.device)
    cols = torch.arange(W, device=positions.device)
    top, left = positions[:, 0:1], positions[:, 1:2]
    in_rows = (rows[None, :] >= top) & (rows[None, :] < top + ph)  # [M, H]
    in_cols = (cols[None, :] >= left) & (cols[None, :] < left + pw)  # [M, W]
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1).float()


def mask_bounding_boxes(masks: torch.Tensor):
    """(positions long [N, 2] top-left, extents long [N, 2] height/width) of each mask's support; an empty mask
    gives position (-1, -1) and extent (0, 0)."""
    support = masks[:, 0] > 0
    out_pos, out_ext = [], []
    for dim in (2, 1):  # rows present: any over columns; columns present: any over rows
        present = support.any(dim)
        n = present.shape[1]
        idx = torch.arange(n, device=masks.device).expand_as(present)
        first = torch.where(present, idx, n).min(1).values
        last = torch.where(present, idx, -1).max(1).values
        empty = ~present.any(1)
        out_pos.append(torch.where(empty, -1, first))
        out_ext.append(torch.where(empty, 0, last - first + 1))
    return torch.stack(out_pos, 1).long(), torch.stack(out_ext, 1).long()


# ----------------------------------------------------------------------------------------------- base class


class PatchAttack:
    """Base class: subclasses implement :meth:`_attack`; callers use ``attack(model, images, labels)``.

    Attributes:
        name: short name used in reports (``"pgd"``, ``"universal"``, ...).
        patch_size: default ``(height, width)`` of the threat model (``__call__`` may override it).
        enforces_patch_size: the attack promises masks that fit in ``patch_size``; a violation raises
            :class:`ThreatModelError`.
        batch_size: images per forward pass of the success check.
    """

    name = "patch-attack"
    enforces_patch_size = True

    def __init__(self, patch_size=None, seed: int = 0, batch_size: int = 64):
        self.patch_size = parse_patch_size(patch_size) if patch_size is not None else None
        if type(seed) is not int:
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.batch_size = check_int("batch_size", batch_size)

    # -- to implement --------------------------------------------------------------------
    def _attack(self, model, images, labels, patch_size, generator):  # pragma: no cover - abstract
        """Attack images the model classifies correctly.

        Returns ``(adv_images [n, 3, H, W], masks [n, 1, H, W] in {0, 1}, positions long [n, 2])`` and optionally
        a fourth item, a dict of extras for ``AttackResult.info``. Runs with the model in eval mode and its
        parameters frozen; gradients with respect to the input are available (``torch.enable_grad()``)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """JSON-serialisable settings, recorded in reports."""
        return {"patch_size": list(self.patch_size) if self.patch_size else None, "seed": self.seed}

    # -- public call ---------------------------------------------------------------------
    def __call__(self, model, images: torch.Tensor, labels, patch_size=None, *, generator: torch.Generator | None = None) -> AttackResult:
        """Attack ``images`` (float [N, 3, H, W] in [0, 1]) with true ``labels`` and return an :class:`AttackResult`.

        ``patch_size`` overrides the attack's default; ``generator`` overrides the attack's seeded generator.
        """
        if not hasattr(model, "local_logits"):
            raise TypeError("attacks need a bagcert model (with .local_logits and .geometry)")
        check_images(images)
        if patch_size is not None:
            patch_size = parse_patch_size(patch_size)
        elif self.patch_size is not None:
            patch_size = self.patch_size
        elif self.enforces_patch_size:
            raise ValueError(f"{type(self).__name__} needs a patch_size (in the constructor or the call)")
        N, _, H, W = images.shape
        if patch_size is not None and (patch_size[0] > H or patch_size[1] > W):
            raise ValueError(f"patch {patch_size[0]}x{patch_size[1]} is larger than the {H}x{W} images")
        labels = _check_labels(labels, N, getattr(model, "num_classes", int(2**31 - 1)), images.device)
        if labels is None:
            raise ValueError("attacks need the true labels")
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(self.seed)

        with restore_model_state(model):
            clean_pred = model_predict(model, images, self.batch_size)
            todo = (clean_pred == labels).nonzero().flatten()
            adv = images.clone()
            masks = torch.zeros(N, 1, H, W, dtype=images.dtype, device=images.device)
            extra = {}
            if todo.numel():
                with torch.enable_grad(), inputs_unchecked(model):
                    out = self._attack(model, images[todo], labels[todo], patch_size, generator)
                a_adv, a_mask = out[0], out[1]
                n = todo.numel()
                if tuple(a_adv.shape) != (n, 3, H, W) or tuple(a_mask.shape) != (n, 1, H, W):
                    raise ThreatModelError(
                        f"{type(self).__name__}._attack returned images {tuple(a_adv.shape)} and masks "
                        f"{tuple(a_mask.shape)} for {n} images of size {H}x{W}"
                    )
                a_mask = a_mask.detach().to(images.dtype)
                if not ((a_mask == 0) | (a_mask == 1)).all():
                    raise ThreatModelError(f"{type(self).__name__} returned a mask that is not binary")
                adv[todo] = a_adv.detach().to(images.dtype)
                masks[todo] = a_mask
                extra = dict(out[3]) if len(out) > 3 and out[3] else {}
            # Threat model, step 3: outside M the input, bit for bit; inside M, clamp to [0, 1].
            inside = masks > 0
            adv = torch.where(inside, torch.nan_to_num(adv, nan=0.0).clamp(0.0, 1.0), images)
            positions, extent = mask_bounding_boxes(masks)
            if patch_size is not None:
                fits = (extent[:, 0] <= patch_size[0]) & (extent[:, 1] <= patch_size[1])
            else:
                fits = torch.ones(N, dtype=torch.bool, device=images.device)
            if self.enforces_patch_size and not bool(fits.all()):
                bad = (~fits).nonzero().flatten()[:5].tolist()
                raise ThreatModelError(
                    f"{type(self).__name__} changed pixels outside a {patch_size[0]}x{patch_size[1]} rectangle "
                    f"(images {bad}, extents {extent[bad].tolist()}): outside its threat model"
                )
            # Step 5: success is what the real model says on the recomposed images.
            pred = model_predict(model, adv, self.batch_size)
        return AttackResult(
            attack=self.name,
            adv_images=adv,
            masks=masks,
            positions=positions,
            success=pred != labels,
            predictions=pred,
            labels=labels,
            clean_predictions=clean_pred,
            in_threat_model=fits,
            patch_size=tuple(patch_size) if patch_size is not None else None,
            info=dict(self.settings(), **extra),
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"
