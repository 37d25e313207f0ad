"""Universal adversarial patch (Brown et al., "Adversarial Patch", 2017), trained with expectation over
transformations (EOT), re-implemented from the paper's description.

One patch P of ``patch_size = (h, w)`` pixels is optimised over many images. At every step each image of a
random mini-batch gets P with its own random pose:

* location: the top-left pixel of the ``h x w`` box, uniform over all boxes fully inside the image;
* rotation: angle U(rotation) degrees about the box centre;
* scale: U(scale) times the largest scale at which the rotated patch still fits in the box.

Placement is one batched ``affine_grid`` / ``grid_sample`` (nearest neighbour, zero fill) of the patch and of a
mask of ones, so patch and mask land on the same pixels; the mask is then intersected with the box. The
patched image therefore differs from the input only inside one ``h x w`` rectangle: the threat model the
certificate covers, whatever the pose (at angle 0 and scale 1 the patch is pasted pixel for pixel).

The loss is the surrogate margin of :mod:`bagcert.attacks.pgd` (relaxed votes by default): untargeted it
lowers ``s_label - max_{c != label} s_c``; with ``target=t`` it raises ``s_t - max_{c != t} s_c``. Steps are
signed gradient steps on P, with a step size decaying linearly to 10 % of ``step_size``.

``fit`` trains the patch (on images disjoint from the evaluation images, for a fair universal attack);
calling the attack evaluates it: ``eval_poses`` random poses per image, keeping the first success
(else the pose with the lowest real margin), judged by the real model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..aggregation import get_aggregation
from ..certification import _check_labels
from ..geometry import parse_patch_size
from ..models.base import check_images
from .base import PatchAttack, check_choice, check_int, check_positive, inputs_unchecked, restore_model_state
from .pgd import SURROGATES, class_margin, surrogate_scores

__all__ = ["UniversalPatch", "place_patch", "sample_poses"]


def sample_poses(n: int, image_size, patch_size, generator: torch.Generator, rotation=(-45.0, 45.0), scale=(0.7, 1.0)):
    """Random poses for ``n`` images: (tops long [n], lefts long [n], angles float64 [n] degrees, scales float64 [n])."""
    H, W = image_size
    ph, pw = parse_patch_size(patch_size)
    dev = generator.device
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64, device=dev).cpu()
    tops = (u[:, 0] * (H - ph + 1)).floor().long().clamp_(max=H - ph)
    lefts = (u[:, 1] * (W - pw + 1)).floor().long().clamp_(max=W - pw)
    angles = rotation[0] + (rotation[1] - rotation[0]) * u[:, 2]
    scales = scale[0] + (scale[1] - scale[0]) * u[:, 3]
    return tops, lefts, angles, scales


def place_patch(images: torch.Tensor, patch: torch.Tensor, tops, lefts, angles=None, scales=None):
    """Paste ``patch`` ([3, h, w] or [B, 3, h, w], values in [0, 1]) into each image's ``h x w`` box at
    (tops[i], lefts[i]), rotated by angles[i] degrees (clockwise as displayed) and scaled by scales[i] times the
    largest scale that keeps the rotated patch inside the box.

    Returns ``(patched [B, 3, H, W], masks [B, 1, H, W] in {0, 1})``; differentiable with respect to ``patch``.
    Pixels outside the box are never changed.
    """
    B, _, H, W = images.shape
    if patch.dim() == 3:
        patch = patch.unsqueeze(0)
    ph, pw = patch.shape[-2:]
    dev, dt = images.device, images.dtype
    tops = torch.as_tensor(tops, dtype=torch.float64).cpu()
    lefts = torch.as_tensor(lefts, dtype=torch.float64).cpu()
    angles = torch.zeros(B, dtype=torch.float64) if angles is None else torch.as_tensor(angles, dtype=torch.float64).cpu()
    scales = torch.ones(B, dtype=torch.float64) if scales is None else torch.as_tensor(scales, dtype=torch.float64).cpu()
    a = torch.deg2rad(angles)
    c, s = torch.cos(a), torch.sin(a)
    # largest k with the rotated (ph x pw) rectangle inside the box: width pw|c| + ph|s| <= pw, height pw|s| + ph|c| <= ph
    fit = torch.minimum(pw / (pw * c.abs() + ph * s.abs()), ph / (pw * s.abs() + ph * c.abs())).clamp(max=1.0)
    k = scales * fit
    cy, cx = tops + ph / 2.0, lefts + pw / 2.0  # box centre in continuous pixel coordinates (pixel i covers [i, i+1))
    # output pixel p (normalised, align_corners=False) -> canvas q = R(-angle) (p - centre) / k, normalised by the canvas
    dx0, dy0 = W / 2.0 - cx, H / 2.0 - cy
    theta = torch.empty(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = c * (W / 2.0) / (k * pw / 2.0)
    theta[:, 0, 1] = s * (H / 2.0) / (k * pw / 2.0)
    theta[:, 0, 2] = (c * dx0 + s * dy0) / (k * pw / 2.0)
    theta[:, 1, 0] = -s * (W / 2.0) / (k * ph / 2.0)
    theta[:, 1, 1] = c * (H / 2.0) / (k * ph / 2.0)
    theta[:, 1, 2] = (-s * dx0 + c * dy0) / (k * ph / 2.0)
    canvas = torch.cat([patch.to(dev, dt).expand(B, -1, -1, -1), torch.ones(B, 1, ph, pw, device=dev, dtype=dt)], dim=1)
    grid = F.affine_grid(theta.to(dev, dt), [B, 4, H, W], align_corners=False)
    sampled = F.grid_sample(canvas, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    t, l = tops.to(dev).long()[:, None], lefts.to(dev).long()[:, None]
    box = ((rows[None] >= t) & (rows[None] < t + ph))[:, :, None] & ((cols[None] >= l) & (cols[None] < l + pw))[:, None, :]
    # the box intersection makes "inside one h x w rectangle" hold by construction, whatever the rounding
    mask = ((sampled[:, 3:] > 0.5) & box[:, None]).to(dt)
    patched = images * (1 - mask) + sampled[:, :3] * mask
    return patched, mask


class UniversalPatch(PatchAttack):
    """One patch for all images, trained with EOT over location, rotation and scale (module doc).

    Args:
        patch_size: int or (height, width) in pixels.
        steps: optimisation steps of :meth:`fit`.
        step_size: initial signed-gradient step (decays linearly to 10 %).
        fit_batch_size: images per optimisation step.
        rotation: angle range in degrees; ``(0, 0)`` for no rotation.
        scale: range of the scale factor relative to the largest fitting scale.
        eval_poses: random poses tried per image when attacking.
        target: class to push images towards (None: untargeted).
        surrogate, temperature: as for :class:`~bagcert.attacks.pgd.PatchPGD`.
        seed: seed of the attack's generator.
    """

    name = "universal"

    def __init__(
        self,
        patch_size=None,
        steps: int = 500,
        step_size: float = 0.05,
        *,
        fit_batch_size: int = 32,
        rotation=(-45.0, 45.0),
        scale=(0.7, 1.0),
        eval_poses: int = 8,
        target: int | None = None,
        surrogate: str = "relaxed_votes",
        temperature: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
    ):
        super().__init__(patch_size, seed=seed, batch_size=batch_size)
        self.steps = check_int("steps", steps, minimum=0)
        self.eval_poses = check_int("eval_poses", eval_poses)
        self.fit_batch_size = check_int("fit_batch_size", fit_batch_size)
        self.step_size = check_positive("step_size", step_size)
        rotation, scale = tuple(float(v) for v in rotation), tuple(float(v) for v in scale)
        if len(rotation) != 2 or rotation[0] > rotation[1]:
            raise ValueError(f"rotation must be a (low, high) range in degrees, got {rotation}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be a range inside (0, 1], got {scale}")
        self.rotation, self.scale = rotation, scale
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.temperature = check_positive("temperature", temperature)
        self.target = target if target is None else check_int("target", target, minimum=0)
        self.patch: torch.Tensor | None = None
        self.fit_info: dict = {}

    def settings(self) -> dict:
        return dict(
            super().settings(),
            steps=self.steps,
            step_size=self.step_size,
            fit_batch_size=self.fit_batch_size,
            rotation=list(self.rotation),
            scale=list(self.scale),
            eval_poses=self.eval_poses,
            target=self.target,
            surrogate=self.surrogate,
            fit=self.fit_info or None,
        )

    def fit(self, model, images: torch.Tensor, labels, target=None, steps: int | None = None, patch_size=None, *, generator=None) -> "UniversalPatch":
        """Train the patch on ``images``/``labels`` (float [N, 3, H, W] in [0, 1]); returns ``self``.

        The model's train/eval mode and ``requires_grad`` flags are restored afterwards.
        """
        check_images(images)
        if patch_size is not None:
            self.patch_size = parse_patch_size(patch_size)
        if self.patch_size is None:
            raise ValueError("UniversalPatch.fit needs a patch_size")
        ph, pw = self.patch_size
        N, _, H, W = images.shape
        if ph > H or pw > W:
            raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} images")
        C = getattr(model, "num_classes", int(2**31 - 1))
        labels = _check_labels(labels, N, C, images.device)
        target = self.target if target is None else target
        if target is not None and not (type(target) is int and 0 <= target < C):
            raise ValueError(f"target must be a class index in [0, {C}), got {target!r}")
        self.target = target
        steps = self.steps if steps is None else steps
        gen = generator if generator is not None else torch.Generator(device=images.device).manual_seed(self.seed)
        dev = images.device
        agg = get_aggregation(getattr(model, "aggregation", "votes"))
        patch = torch.rand(3, ph, pw, generator=gen, device=gen.device, dtype=images.dtype).to(dev)
        losses = []
        with restore_model_state(model), inputs_unchecked(model), torch.enable_grad():
            for step in range(steps):
                idx = torch.randint(0, N, (min(self.fit_batch_size, N),), generator=gen, device=gen.device).to(dev)
                x, y = images[idx], labels[idx]
                pose = sample_poses(idx.numel(), (H, W), (ph, pw), gen, self.rotation, self.scale)
                patch.requires_grad_(True)
                xa, _ = place_patch(x, patch, *pose)
                z = model.local_logits(xa)
                scores = surrogate_scores(z, agg, self.surrogate, self.temperature)
                if target is None:
                    loss = class_margin(scores, y).mean()  # lower the true class's margin
                else:
                    loss = -class_margin(scores, torch.full_like(y, target)).mean()  # raise the target's margin
                (grad,) = torch.autograd.grad(loss, patch)
                lr = self.step_size * (1.0 - 0.9 * step / max(1, steps))
                with torch.no_grad():
                    patch = (patch.detach() - lr * grad.sign()).clamp_(0.0, 1.0)
                losses.append(float(loss.detach()))
        self.patch = patch.detach()
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        self.fit_info = {
            "images": int(N),
            "steps": int(steps),
            "target": target,
            "final_loss": float(sum(tail) / len(tail)) if tail else None,
        }
        return self

    def _attack(self, model, images, labels, patch_size, generator):
        if self.patch is None:
            raise RuntimeError("UniversalPatch has no patch yet: call .fit(model, train_images, train_labels) first")
        if tuple(patch_size) != tuple(self.patch.shape[-2:]):
            raise ValueError(f"the patch was fitted for {tuple(self.patch.shape[-2:])}, not {tuple(patch_size)}")
        N, _, H, W = images.shape
        dev = images.device
        agg = get_aggregation(getattr(model, "aggregation", "votes"))
        best_adv, best_mask = images.clone(), torch.zeros(N, 1, H, W, dtype=images.dtype, device=dev)
        best_pos = torch.zeros(N, 2, dtype=torch.long, device=dev)
        best_rm = torch.full((N,), float("inf"), dtype=torch.float64, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        targeted = torch.zeros(N, dtype=torch.bool, device=dev)
        with torch.no_grad():
            for _ in range(self.eval_poses):
                todo = (~done).nonzero().flatten()
                if todo.numel() == 0:
                    break
                for i0 in range(0, todo.numel(), self.batch_size):
                    idx = todo[i0 : i0 + self.batch_size]
                    tops, lefts, angles, scales = sample_poses(idx.numel(), (H, W), patch_size, generator, self.rotation, self.scale)
                    xa, m = place_patch(images[idx], self.patch, tops, lefts, angles, scales)
                    scores = agg.class_scores(model.local_logits(xa))
                    pred = scores.argmax(dim=1)
                    rm = class_margin(scores.double(), labels[idx])
                    succ = pred != labels[idx]
                    better = succ | (rm < best_rm[idx])
                    tgt = idx[better]
                    best_adv[tgt], best_mask[tgt], best_rm[tgt] = xa[better], m[better], rm[better]
                    best_pos[tgt] = torch.stack([tops, lefts], 1).to(dev)[better]
                    done[idx[succ]] = True
                    if self.target is not None:
                        targeted[idx[succ]] = pred[succ] == self.target
        info = {"targeted_success_rate_on_attacked": float(targeted.float().mean()) if self.target is not None and N else None}
        return best_adv, best_mask, best_pos, info
