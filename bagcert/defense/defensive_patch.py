"""Defensive patches: class-specific patterns that help a model recognise the class they are pasted on.

Re-implemented from the description of Wang et al., "Defensive Patches for Robust Recognition in the
Physical World" (CVPR 2022); see ``docs/reference.md`` section 7. The defender knows the class of
the object it protects and sticks that class's patch on it; the model then recognises the object
more robustly under corruptions and adversarial noise.

Shape (``patch_mask``)
    ``"frame"`` (default): a square ring, centred. On a 32x32 image the default is the released
    code's 2-pixel ring, 30x30 outer minus 26x26 inner = 224 pixels (21.9 % of the image). For
    other sizes the defaults scale with the shorter side ``s``: ring width ``max(1, round(2 s / 32))``
    and margin to the border ``max(1, round(s / 32))`` (outer side ``s - 2 * margin``), so the ring
    covers about the same fraction of the image. ``"square"``: a filled square at a corner
    (default side ``max(1, round(s / 4))``, 8 pixels at 32x32).

Parameters
    One value per class, channel and masked pixel: ``values`` float [C, 3, K] in [0, 1] with
    ``K = mask.sum()``. ``apply(images, labels)`` overwrites the masked pixels of image i with the
    patch of ``labels[i]``.

Optimisation (:func:`make_defensive_patches`), every epoch / step count a parameter
    Stage 1, local prior (:func:`optimize_local_prior`): the patch alone, on a blank image
    (every other pixel ``blank``, default 0.5: mid-grey, close to the data mean, so the
    normalised input is near zero outside the patch), is optimised with cross-entropy so that every model
    predicts the patch's class; Adam, lr 1e-3, 10 epochs over the training labels.

    Stage 2, global correlation (:func:`optimize_global_correlation`), for each outer epoch:
    (a) every model gets its own copy of the patch, trained with cross-entropy on patched training
    images for one pass (fresh Adam, lr 0.03); (b) the shared patch is updated, for one pass over
    the training images, to make its *correlation matrix* match those of the copies (Adam, lr
    0.03, kept across epochs). Both learning rates are multiplied by ``gamma = 1/3`` at each
    milestone (defaults 3, 8, 15, 25 of 30 outer epochs; epochs count from 0 and epoch ``e`` runs
    with ``gamma ** #{milestones <= e}``, as ``MultiStepLR`` stepped after each epoch).

    Correlation matrix (our concrete reading of the paper's description, whose exact form is not
    available): for a batch of B patched images mapped to ``z = 2 x - 1`` (in [-1, 1]), with
    ``r_bc`` the K ring pixels and ``z_bc`` all N = H W pixels of channel c of image b,

        M = 1 / (3 B) * sum_{b, c} outer(r_bc, z_bc)        (a K x N matrix)

    i.e. the correlation of every ring pixel with every pixel, over channels and images. The
    update minimises ``mean_m ||M(shared) - M(copy_m)||_F^2 / (K N)`` on the same images. The
    matrix is never built: ``||U1^T V1 - U2^T V2||_F^2`` is computed from the small (3B x 3B)
    Gram matrices ``U U'^T`` and ``V V'^T`` (:func:`correlation_distance`), so 224 px images cost
    no more memory than 32 px ones.

    Optional expectation over transformations (``eot=True``): before every cross-entropy step
    the patched image is shifted by up to ``max_shift`` pixels (zero fill) and its brightness
    scaled by U(1 - ``brightness``, 1 + ``brightness``), clipped to [0, 1].

Gradients go through ``model.mean_logits`` for bagcert models (``model(x)`` gives vote counts, which
have no gradient) or through any callable returning logits [B, C]; only the patch receives gradients
(the models' parameters and ``.grad`` are not touched) and every model runs in eval mode (restored
afterwards). Values are kept in [0, 1] by clipping after each step. All randomness comes from
``seed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..attacks.base import check_int
from ..checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from ..data import augment_batch
from .common import as_float_images, check_labels, eval_mode, logits_fn_of

__all__ = [
    "frame_mask",
    "square_mask",
    "patch_mask",
    "DefensivePatch",
    "correlation_matrix",
    "correlation_distance",
    "optimize_local_prior",
    "optimize_global_correlation",
    "make_defensive_patches",
    "random_transform",
]

FORMAT = "bagcert-defensive-patch"
FORMAT_VERSION = 1
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _size2(image_size) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise TypeError(f"image_size must be an int or (height, width), got {image_size!r}")
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


# --- geometry ----------------------------------------------------------------------------------
def frame_mask(image_size, outer: int | None = None, width: int | None = None) -> torch.Tensor:
    """Boolean [H, W] mask of a centred square ring: an ``outer`` x ``outer`` square minus the
    centred ``(outer - 2 width)`` square inside it.

    Defaults (``s`` the shorter image side): ``width = max(1, round(2 s / 32))``,
    ``outer = s - 2 max(1, round(s / 32))``; for 32x32 that is 30x30 minus 26x26 (224 pixels).
    The top-left corner of the outer square is ``((H - outer) // 2, (W - outer) // 2)``.
    """
    h, w = _size2(image_size)
    s = min(h, w)
    width = max(1, round(2 * s / 32)) if width is None else int(width)
    outer = s - 2 * max(1, round(s / 32)) if outer is None else int(outer)
    if not 1 <= outer <= s:
        raise ValueError(f"frame outer side must lie in [1, {s}] for a {h}x{w} image, got {outer}")
    if width < 1:
        raise ValueError(f"frame width must be >= 1, got {width}")
    if 2 * width > outer:
        raise ValueError(f"frame width {width} is too wide for outer side {outer} (need 2 * width <= outer)")
    top, left = (h - outer) // 2, (w - outer) // 2
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + outer, left : left + outer] = True
    inner = outer - 2 * width
    if inner > 0:
        mask[top + width : top + width + inner, left + width : left + width + inner] = False
    return mask


def square_mask(image_size, size: int | None = None, corner: str = "top-left", margin: int = 0) -> torch.Tensor:
    """Boolean [H, W] mask of a filled ``size`` x ``size`` square at ``corner``, ``margin`` pixels
    from both borders. Default ``size = max(1, round(s / 4))`` (``s`` the shorter side)."""
    h, w = _size2(image_size)
    s = min(h, w)
    size = max(1, round(s / 4)) if size is None else int(size)
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    if margin < 0 or size < 1 or size + margin > s:
        raise ValueError(f"a square of side {size} at margin {margin} does not fit a {h}x{w} image")
    top = margin if corner.startswith("top") else h - margin - size
    left = margin if corner.endswith("left") else w - margin - size
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def patch_mask(image_size, shape: str = "frame", **kwargs) -> torch.Tensor:
    """``frame_mask`` (``shape="frame"``: ``outer``, ``width``) or ``square_mask`` (``"square"``:
    ``size``, ``corner``, ``margin``). Keyword arguments that are ``None`` take their defaults."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if shape == "frame":
        return frame_mask(image_size, **kwargs)
    if shape == "square":
        return square_mask(image_size, **kwargs)
    raise ValueError(f"shape must be 'frame' or 'square', got {shape!r}")


# --- the patch ---------------------------------------------------------------------------------
class DefensivePatch:
    """One patch per class: ``values`` float [C, 3, K] in [0, 1] on the pixels of ``mask`` [H, W].

    Build one with :meth:`create` (initial values) or :func:`make_defensive_patches` (optimised),
    read one with :meth:`load`.
    """

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, classes: Sequence[str] | None = None, config: dict | None = None):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a boolean tensor [H, W], got {getattr(mask, 'shape', type(mask).__name__)}")
        k = int(mask.sum())
        if k == 0:
            raise ValueError("mask is empty: a defensive patch needs at least one pixel")
        if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] != 3 or values.shape[2] != k:
            raise ValueError(f"values must be [num_classes, 3, {k}] (one value per masked pixel), got {getattr(values, 'shape', None)}")
        if values.shape[0] < 1:
            raise ValueError("values must hold at least one class")
        values = values.detach().float()
        if not torch.isfinite(values).all() or float(values.min()) < 0 or float(values.max()) > 1:
            raise ValueError("patch values must be finite and lie in [0, 1]")
        if classes is not None and len(classes) != values.shape[0]:
            raise ValueError(f"{len(classes)} class names for {values.shape[0]} patches")
        self.values = values
        self.mask = mask.cpu()
        self.classes = list(classes) if classes is not None else None
        self.config = dict(config or {})
        self._index = self.mask.flatten().nonzero().flatten()

    @classmethod
    def create(cls, num_classes: int, image_size, shape: str = "frame", init: str = "random", seed: int = 0,
               classes: Sequence[str] | None = None, **shape_kwargs) -> "DefensivePatch":
        """Initial patches: ``init="random"`` (uniform in [0, 1], seeded) or ``"grey"`` (all 0.5)."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        mask = patch_mask(image_size, shape, **shape_kwargs)
        k = int(mask.sum())
        if init == "random":
            values = torch.rand(num_classes, 3, k, generator=torch.Generator().manual_seed(seed))
        elif init == "grey":
            values = torch.full((num_classes, 3, k), 0.5)
        else:
            raise ValueError(f"init must be 'random' or 'grey', got {init!r}")
        config = {"shape": shape, **{k_: v for k_, v in shape_kwargs.items() if v is not None}, "init": init, "seed": seed}
        return cls(values, mask, classes, config)

    # -- properties ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.values.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    @property
    def num_pixels(self) -> int:
        """Masked pixels per channel (224 for the default 32x32 ring)."""
        return int(self._index.numel())

    def patches(self) -> torch.Tensor:
        """The patches as images [C, 3, H, W], zero outside the mask."""
        return paste(torch.zeros(self.num_classes, 3, *self.image_size), self.values, self.mask)

    # -- application ---------------------------------------------------------------------
    def _check(self, images: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
        x = as_float_images(images)
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(x.shape[-2:])} but the patch was made for {self.image_size}")
        y = check_labels(labels, x.shape[0], self.num_classes)
        return x, y

    def apply(self, images: torch.Tensor, labels) -> torch.Tensor:
        """Paste the patch of ``labels[i]`` onto image i (a new tensor; the input is not modified)."""
        x, y = self._check(images, labels)
        return paste(x, self.values.to(x.device, x.dtype)[y.to(x.device)], self.mask)

    def patch_only(self, labels, blank: float = 0.5) -> torch.Tensor:
        """Images [B, 3, H, W] that are ``blank`` everywhere except the patch of each label."""
        y = check_labels(labels, torch.as_tensor(labels).numel(), self.num_classes)
        base = torch.full((y.numel(), 3, *self.image_size), float(blank))
        return paste(base, self.values[y], self.mask)

    # -- files -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "values": self.values.clone(),
            "mask": self.mask.clone(),
            "classes": self.classes,
            # JSON round trip: only builtins reach the file, so weights_only loading accepts it
            "config": json.loads(json.dumps(self.config, default=str)),
        }

    def save(self, path) -> Path:
        """Write the patch atomically as a dict of plain tensors and builtins (``torch.save``)."""
        atomic_torch_save(self.state_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path) -> "DefensivePatch":
        """Read a patch written by :meth:`save` with ``torch.load(weights_only=True)``."""
        obj = safe_torch_load(path, "defensive patch")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a defensive patch file (no 'format': '{FORMAT}' entry)")
        if obj.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has defensive patch format version {obj.get('format_version')!r}; this reads {FORMAT_VERSION}")
        try:
            return cls(obj["values"], obj["mask"], obj.get("classes"), obj.get("config"))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path} is malformed: {e}") from None

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"DefensivePatch(num_classes={self.num_classes}, image_size={h}x{w}, pixels={self.num_pixels}, shape={self.config.get('shape')!r})"


def paste(images: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Out-of-place, differentiable: ``images`` [B, 3, H, W] with the pixels of ``mask`` set to
    ``values`` [B, 3, K] (K = mask.sum(), in row-major order of the mask)."""
    b, c, h, w = images.shape
    index = mask.to(images.device).flatten().nonzero().flatten()
    out = images.reshape(b, c, h * w).index_copy(2, index, values.to(images.dtype))
    return out.reshape(b, c, h, w)


# --- correlation ---------------------------------------------------------------------------------
def _rows(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)``: ring pixels [3B, K] and all pixels [3B, N] of ``z = 2 x - 1``."""
    z = 2.0 * images - 1.0
    v = z.reshape(-1, z.shape[-2] * z.shape[-1])
    u = v[:, mask.to(images.device).flatten()]
    return u, v


def correlation_matrix(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The K x N correlation matrix ``1/(3B) sum_{b,c} outer(r_bc, z_bc)`` of a batch (explicit;
    for small images and tests -- the optimisation uses :func:`correlation_distance`)."""
    u, v = _rows(images, mask)
    return u.t() @ v / u.shape[0]


def correlation_distance(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``||M(images_a) - M(images_b)||_F^2 / (K N)`` without building the K x N matrices.

    With ``M = U^T V / n``: ``||U1^T V1 - U2^T V2||^2 = <U1 U1^T, V1 V1^T> - 2 <U1 U2^T, V1 V2^T>
    + <U2 U2^T, V2 V2^T>``, each term a sum over (3B x 3B) Gram matrices.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"both batches must have the same shape, got {tuple(images_a.shape)} and {tuple(images_b.shape)}")
    u1, v1 = _rows(images_a, mask)
    u2, v2 = _rows(images_b, mask)
    n = u1.shape[0]
    aa = ((u1 @ u1.t()) * (v1 @ v1.t())).sum()
    ab = ((u1 @ u2.t()) * (v1 @ v2.t())).sum()
    bb = ((u2 @ u2.t()) * (v2 @ v2.t())).sum()
    return (aa - 2 * ab + bb).clamp_min(0) / (n * n * u1.shape[1] * v1.shape[1])


# --- optimisation ----------------------------------------------------------------------------------
def random_transform(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2, brightness: float = 0.1) -> torch.Tensor:
    """Expectation-over-transformation sample: random shift of up to ``max_shift`` pixels (zero
    fill) and brightness factor U(1 - b, 1 + b), clipped to [0, 1]; differentiable in ``x``."""
    if max_shift > 0:
        x = augment_batch(x, generator, flip=False, pad=int(max_shift))
    if brightness > 0:
        f = 1.0 + (2.0 * torch.rand(x.shape[0], generator=generator) - 1.0) * float(brightness)
        x = (x * f.to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return x


def _as_models(models) -> list:
    if isinstance(models, (list, tuple)):
        models = list(models)
    else:
        models = [models]
    if not models:
        raise ValueError("need at least one model")
    return models


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=generator)
    return [perm[s : s + batch_size] for s in range(0, n, batch_size)]


def _ce(logits_fns, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(fn(x).float(), y) for fn in logits_fns) / len(logits_fns)


def _step(opt: torch.optim.Optimizer, param: torch.Tensor, loss: torch.Tensor) -> None:
    # gradient for the patch only: the models' parameters and their .grad are left alone
    (grad,) = torch.autograd.grad(loss, [param])
    param.grad = grad
    opt.step()
    with torch.no_grad():
        param.clamp_(0.0, 1.0)


def optimize_local_prior(
    patch: DefensivePatch,
    models,
    labels=None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    blank: float = 0.5,
    eot: bool = False,
    max_shift: int = 2,
    brightness: float = 0.1,
    seed: int = 0,
    progress: Callable | None = None,
) -> list[float]:
    """Stage 1, in place: train the patch alone on a blank image with cross-entropy (Adam).

    One epoch is one pass, in shuffled batches, over ``labels`` (default: each class once; the
    full pipeline passes the training labels, so classes are weighted as in the data). Returns
    the mean loss of each epoch.
    """
    epochs = check_int("epochs", epochs, minimum=0)
    models = _as_models(models)
    fns = [logits_fn_of(m) for m in models]
    labels = torch.arange(patch.num_classes) if labels is None else check_labels(labels, torch.as_tensor(labels).numel(), patch.num_classes)
    gen = torch.Generator().manual_seed(seed)
    param = patch.values.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    history = []
    with eval_mode(*models):
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in _batches(labels.numel(), batch_size, gen):
                y = labels[idx]
                x = paste(torch.full((y.numel(), 3, *patch.image_size), float(blank)), param[y], patch.mask)
                if eot:
                    x = random_transform(x, gen, max_shift, brightness)
                loss = _ce(fns, x, y)
                _step(opt, param, loss)
                total += float(loss.detach()) * y.numel()
                count += y.numel()
            history.append(total / count)
            if progress is not None:
                progress("local_prior", epoch, history[-1])
    patch.values = param.detach().clone()
    return history


def optimize_global_correlation(
    patch: DefensivePatch,
    models,
    images: torch.Tensor,
    labels,
    epochs: int = 30,
    lr: float = 0.03,
    correlation_lr: float = 0.03,
    milestones: Sequence[int] = (3, 8, 15, 25),
    gamma: float = 1 / 3,
    batch_size: int = 128,
    eot: bool = False,
    max_shift: int = 2,
    brightness: float = 0.1,
    seed: int = 0,
    progress: Callable | None = None,
) -> list[dict]:
    """Stage 2, in place: per-model copies trained with cross-entropy, then correlation matching.

    Returns one dict per outer epoch: ``lr_scale``, ``ce`` (mean cross-entropy of each copy's pass,
    one per model) and ``correlation`` (mean correlation distance of the shared update's pass).
    """
    epochs = check_int("epochs", epochs, minimum=0)
    models = _as_models(models)
    fns = [logits_fn_of(m) for m in models]
    y_all = check_labels(labels, images.shape[0], patch.num_classes)
    if tuple(images.shape[-2:]) != patch.image_size:
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the patch was made for {patch.image_size}")
    gen = torch.Generator().manual_seed(seed)
    shared = patch.values.clone().requires_grad_(True)
    shared_opt = torch.optim.Adam([shared], lr=correlation_lr)
    history = []
    with eval_mode(*models):
        for epoch in range(epochs):
            scale = gamma ** sum(1 for m in milestones if m <= epoch)
            # (a) one copy per model, one pass of cross-entropy with a fresh Adam
            copies, ces = [], []
            for fn in fns:
                copy = shared.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([copy], lr=lr * scale)
                total, count = 0.0, 0
                for idx in _batches(y_all.numel(), batch_size, gen):
                    x, y = as_float_images(images[idx]), y_all[idx]
                    xp = paste(x, copy[y], patch.mask)
                    if eot:
                        xp = random_transform(xp, gen, max_shift, brightness)
                    loss = F.cross_entropy(fn(xp).float(), y)
                    _step(opt, copy, loss)
                    total += float(loss.detach()) * y.numel()
                    count += y.numel()
                copies.append(copy.detach())
                ces.append(total / count)
            # (b) the shared patch matches the copies' correlation matrices on the same images
            for group in shared_opt.param_groups:
                group["lr"] = correlation_lr * scale
            total, count = 0.0, 0
            for idx in _batches(y_all.numel(), batch_size, gen):
                x, y = as_float_images(images[idx]), y_all[idx]
                xs = paste(x, shared[y], patch.mask)
                loss = sum(correlation_distance(xs, paste(x, c[y], patch.mask), patch.mask) for c in copies) / len(copies)
                _step(shared_opt, shared, loss)
                total += float(loss.detach()) * y.numel()
                count += y.numel()
            history.append({"epoch": epoch, "lr_scale": scale, "ce": ces, "correlation": total / count})
            if progress is not None:
                progress("global_correlation", epoch, history[-1])
    patch.values = shared.detach().clone()
    return history


def make_defensive_patches(
    models,
    images: torch.Tensor,
    labels,
    num_classes: int | None = None,
    shape: str = "frame",
    outer: int | None = None,
    width: int | None = None,
    size: int | None = None,
    corner: str | None = None,
    init: str = "random",
    stage1_epochs: int = 10,
    stage1_lr: float = 1e-3,
    stage2_epochs: int = 30,
    stage2_lr: float = 0.03,
    correlation_lr: float = 0.03,
    milestones: Sequence[int] = (3, 8, 15, 25),
    gamma: float = 1 / 3,
    batch_size: int = 128,
    blank: float = 0.5,
    eot: bool = False,
    max_shift: int = 2,
    brightness: float = 0.1,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    progress: Callable | None = None,
) -> DefensivePatch:
    """Make class-specific defensive patches for ``models`` (one model or a list) from training
    ``images`` (uint8, or float in [0, 1], [N, 3, H, W]) and ``labels``: stage 1 then stage 2.

    ``num_classes`` defaults to the first model's ``num_classes`` (or ``labels.max() + 1``). The
    returned patch's ``config`` records every argument and ``config["history"]`` the losses.
    """
    models = _as_models(models)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(images, 'shape', type(images).__name__)}")
    if images.is_floating_point() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError("float images must lie in [0, 1]")
    if num_classes is None:
        num_classes = getattr(models[0], "num_classes", None) or int(torch.as_tensor(labels).max()) + 1
    labels = check_labels(labels, images.shape[0], num_classes)
    shape_kwargs = {"outer": outer, "width": width} if shape == "frame" else {"size": size, "corner": corner}
    patch = DefensivePatch.create(num_classes, tuple(images.shape[-2:]), shape, init=init, seed=seed, classes=classes, **shape_kwargs)
    common = dict(batch_size=batch_size, eot=eot, max_shift=max_shift, brightness=brightness, progress=progress)
    h1 = optimize_local_prior(patch, models, labels, epochs=stage1_epochs, lr=stage1_lr, blank=blank, seed=seed + 1, **common)
    h2 = optimize_global_correlation(
        patch, models, images, labels, epochs=stage2_epochs, lr=stage2_lr, correlation_lr=correlation_lr,
        milestones=milestones, gamma=gamma, seed=seed + 2, **common,
    )
    patch.config.update(
        num_models=len(models), stage1_epochs=stage1_epochs, stage1_lr=stage1_lr, stage2_epochs=stage2_epochs,
        stage2_lr=stage2_lr, correlation_lr=correlation_lr, milestones=list(milestones), gamma=gamma,
        batch_size=batch_size, blank=blank, eot=eot, max_shift=max_shift, brightness=brightness,
        num_train_images=int(images.shape[0]), history={"local_prior": h1, "global_correlation": h2},
    )
    if not all(math.isfinite(v) for v in h1):
        raise FloatingPointError("stage 1 produced a non-finite loss")
    return patch
