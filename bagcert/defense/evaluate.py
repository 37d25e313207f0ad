"""Evaluate defensive patches: accuracy with and without the patch under corruptions and attacks.

Protocol (the paper's own evaluation protocol is not available; this is ours, see
``docs/analysis.md``). The defensive patch is part of the scene: it is pasted first (the class of
every image is known to the defender) and everything else acts on the patched image.

* clean: the images as they are vs. with the patch.
* corruptions: every corruption of :mod:`bagcert.defense.corruptions` at each severity, applied
  to the image / the patched image with the *same* random draw (same seed).
* L-inf PGD (:func:`~bagcert.defense.corruptions.linf_pgd`): a white-box attacker who sees the
  patched image perturbs every pixel, the patch included, within ``eps``.
* adversarial patch (:func:`random_patch_attack`): a square patch at a random position per image
  (the same positions with and without the defensive patch), its pixels free in [0, 1], optimised
  with signed-gradient steps on the cross-entropy; where it overlaps the defensive patch it wins.

Gradients go through the model's logits (``model.mean_logits`` for bagcert models); accuracy is
measured with the model's own prediction (``argmax model(x)``: votes for bagcert models), or with
the logits' argmax with ``prediction="logits"``. Every model is evaluated in eval mode (its mode is
restored afterwards). The same patch can be evaluated on a model it was not made for
(:func:`evaluate_transfer`).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .common import as_float_images, check_labels, eval_mode, logits_fn_of, predict_fn_of
from .corruptions import CORRUPTIONS, corrupt, linf_pgd
from .defensive_patch import DefensivePatch

__all__ = ["random_patch_attack", "evaluate_defensive_patch", "evaluate_transfer"]


def random_patch_attack(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y,
    patch_size: int | tuple[int, int] = 5,
    steps: int = 20,
    step: float = 0.05,
    restarts: int = 1,
    seed: int = 0,
    predict_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked patch PGD at a random location per image (a small, local attack for evaluations).

    For each restart: draw a position per image (uniform over positions fully inside the image,
    from a generator seeded with ``seed``), start from uniform noise in the patch, and take ``steps``
    steps ``P <- clip(P + step * sign(grad CE), 0, 1)`` on the patch pixels only. With
    ``restarts > 1`` an image keeps the first restart whose result ``predict_fn`` (default: argmax
    of ``logits_fn``) misclassifies, otherwise the last one. Pixels outside the patch are never
    changed (the output is recomposed as ``x (1 - M) + P M``).

    Returns ``(x_adv, positions)``: the adversarial images and long [B, 2] (top, left) positions.
    """
    x0 = as_float_images(x).detach()
    y = check_labels(y, x0.shape[0]).to(x0.device)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
    b, _, h, w = x0.shape
    if not (1 <= ph <= h and 1 <= pw <= w):
        raise ValueError(f"attack patch {ph}x{pw} does not fit {h}x{w} images")
    if restarts < 1 or steps < 0:
        raise ValueError(f"need restarts >= 1 and steps >= 0, got restarts={restarts}, steps={steps}")
    if predict_fn is None:
        def predict_fn(z):
            with torch.no_grad():
                return logits_fn(z).argmax(dim=1)
    g = torch.Generator().manual_seed(int(seed))
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    best = x0.clone()
    best_pos = torch.zeros(b, 2, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(int(restarts)):
        top = torch.randint(0, h - ph + 1, (b,), generator=g)
        left = torch.randint(0, w - pw + 1, (b,), generator=g)
        m = ((rows >= top.view(b, 1, 1)) & (rows < (top + ph).view(b, 1, 1)) & (cols >= left.view(b, 1, 1)) & (cols < (left + pw).view(b, 1, 1)))
        m = m.unsqueeze(1).to(x0.device, x0.dtype)
        p = torch.rand(x0.shape, generator=g).to(x0.device, x0.dtype)
        for _ in range(int(steps)):
            p.requires_grad_(True)
            loss = F.cross_entropy(logits_fn(x0 * (1 - m) + p * m).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [p])
            with torch.no_grad():
                p = (p + step * grad.sign()).clamp(0.0, 1.0)
        adv = (x0 * (1 - m) + p.detach() * m).clamp(0.0, 1.0)
        take = ~done
        best[take] = adv[take]
        best_pos[take] = torch.stack([top, left], dim=1)[take]
        done |= take & (predict_fn(adv).cpu() != y.cpu())
        if bool(done.all()):
            break
    return best, best_pos


def _seed(base: int, *parts: int) -> int:
    s = int(base)
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


def evaluate_defensive_patch(
    model,
    patch: DefensivePatch,
    images: torch.Tensor,
    labels,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    pgd_eps: float | None = 8 / 255,
    pgd_steps: int = 10,
    pgd_step: float = 2 / 255,
    attack_patch_size: int | tuple[int, int] | None = 5,
    attack_steps: int = 20,
    attack_step: float = 0.05,
    attack_restarts: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    prediction: str = "model",
) -> dict:
    """Accuracy of ``model`` on ``images`` without / with the defensive ``patch``.

    ``corruptions`` defaults to all of :data:`~bagcert.defense.corruptions.CORRUPTIONS` (``[]`` for
    none); ``pgd_eps=None`` skips PGD and ``attack_patch_size=None`` the patch attack.

    Returns a dict (all accuracies floats in [0, 1])::

        {"n": int, "prediction": str, "severities": [...],
         "clean": {"without": a, "with": a},
         "corruptions": {name: {"without": [a per severity], "with": [...]}},
         "corruption_mean": {"without": a, "with": a} | None,    # mean over names and severities
         "pgd": {"eps", "steps", "step", "without", "with"} | None,
         "patch_attack": {"patch_size", "steps", "step", "restarts", "without", "with"} | None,
         "timing_s": float}
    """
    t0 = time.perf_counter()
    x_all = images
    if not isinstance(x_all, torch.Tensor) or x_all.dim() != 4:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(x_all, 'shape', None)}")
    y_all = check_labels(labels, x_all.shape[0], patch.num_classes)
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    for name in names:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    severities = [int(s) for s in severities]
    logits_fn = logits_fn_of(model)
    predict = predict_fn_of(model, prediction)
    keys = ["clean"] + [f"{c}@{s}" for c in names for s in severities]
    if pgd_eps is not None:
        keys.append("pgd")
    if attack_patch_size is not None:
        keys.append("patch_attack")
    correct = {k: [0, 0] for k in keys}  # [without, with]
    n = int(y_all.numel())
    with eval_mode(model):
        for bi, start in enumerate(range(0, n, batch_size)):
            x = as_float_images(x_all[start : start + batch_size]).clone()
            y = y_all[start : start + batch_size]
            xp = patch.apply(x, y)

            def count(key, a, b):
                correct[key][0] += int((predict(a).cpu() == y).sum())
                correct[key][1] += int((predict(b).cpu() == y).sum())

            count("clean", x, xp)
            for ci, name in enumerate(names):
                for s in severities:
                    sd = _seed(seed, bi, ci, s)  # the same draw with and without the patch
                    count(f"{name}@{s}", corrupt(x, name, s, sd), corrupt(xp, name, s, sd))
            if pgd_eps is not None:
                sd = _seed(seed, bi, 10_001)
                count("pgd", linf_pgd(logits_fn, x, y, pgd_eps, pgd_steps, pgd_step, seed=sd),
                      linf_pgd(logits_fn, xp, y, pgd_eps, pgd_steps, pgd_step, seed=sd))
            if attack_patch_size is not None:
                sd = _seed(seed, bi, 10_002)
                kw = dict(patch_size=attack_patch_size, steps=attack_steps, step=attack_step, restarts=attack_restarts, seed=sd, predict_fn=predict)
                count("patch_attack", random_patch_attack(logits_fn, x, y, **kw)[0], random_patch_attack(logits_fn, xp, y, **kw)[0])

    def acc(key):
        return {"without": correct[key][0] / n, "with": correct[key][1] / n}

    out = {"n": n, "prediction": prediction, "severities": severities, "clean": acc("clean"), "corruptions": {}}
    for name in names:
        out["corruptions"][name] = {
            "without": [correct[f"{name}@{s}"][0] / n for s in severities],
            "with": [correct[f"{name}@{s}"][1] / n for s in severities],
        }
    if names and severities:
        cells = [f"{c}@{s}" for c in names for s in severities]
        out["corruption_mean"] = {
            "without": sum(correct[k][0] for k in cells) / (n * len(cells)),
            "with": sum(correct[k][1] for k in cells) / (n * len(cells)),
        }
    else:
        out["corruption_mean"] = None
    out["pgd"] = {"eps": pgd_eps, "steps": pgd_steps, "step": pgd_step, **acc("pgd")} if pgd_eps is not None else None
    if attack_patch_size is not None:
        out["patch_attack"] = {"patch_size": attack_patch_size if isinstance(attack_patch_size, int) else list(attack_patch_size),
                               "steps": attack_steps, "step": attack_step, "restarts": attack_restarts, **acc("patch_attack")}
    else:
        out["patch_attack"] = None
    out["timing_s"] = time.perf_counter() - t0
    return out


def evaluate_transfer(models: Mapping[str, object], patch: DefensivePatch, images: torch.Tensor, labels, **kwargs) -> dict:
    """:func:`evaluate_defensive_patch` for each named model (e.g. the source model and others the
    patch was not made for): ``{name: results}``."""
    return {name: evaluate_defensive_patch(m, patch, images, labels, **kwargs) for name, m in models.items()}
