"""Per-image patch PGD, with random or certificate-guided ("adaptive") patch placement.

The attack used by the IBP and De-randomized-smoothing evaluations (reference section 4): the pixels inside
the patch are free in [0, 1]; sign-gradient steps of 0.05, 150 steps, random start, 80 random locations per
image; the worst outcome over locations is kept (the first success, else the lowest true-class margin).

Vote models have no gradient: a location's vote is a Heaviside step of its logit. The attack therefore
descends on a differentiable *surrogate* and judges every step with the real model:

* ``surrogate="relaxed_votes"`` (default): the model's aggregation with the hard step relaxed --
  ``sigmoid(z / T)`` summed over locations for ``votes``, ``softmax(z / T)`` over classes summed over
  locations for ``majority``, and the exact (already differentiable) ``tanh(0.05 z - 1)`` for ``clipped``;
* ``surrogate="logits"``: the mean local logits (the classic BagNet pooled logits).

The loss is the surrogate margin ``s_y - max_{c != y} s_c`` (minimised). The real vote counts come for free
from the same forward pass (``(z > 0).sum``), so success is checked after every step; an image stops as soon
as one of its locations succeeds. :class:`~bagcert.attacks.base.PatchAttack` recomputes success on the final
images with the real model anyway.

``placement="adaptive"`` puts the patch where the certificate is weakest: the ``locations`` patch positions
with the smallest certificate margin (``bagcert.certify(..., return_position_margins=True)``), ties broken at
random. A margin <= 0 is a position the certificate cannot rule out; an attack that succeeds anywhere must
succeed at such a position (for a certified image there is none).
"""

from __future__ import annotations

import torch

from ..aggregation import get_aggregation
from ..certification import certify
from ..geometry import parse_patch_size
from .base import PatchAttack, check_choice, check_int, check_positive, rectangle_masks

__all__ = ["PatchPGD", "SURROGATES", "surrogate_scores", "class_margin", "random_positions", "adaptive_positions"]

SURROGATES = ("relaxed_votes", "logits")
PLACEMENTS = ("random", "adaptive")


def surrogate_scores(local_logits: torch.Tensor, aggregation="votes", surrogate: str = "relaxed_votes", temperature: float = 1.0) -> torch.Tensor:
    """Differentiable class scores [B, C] standing in for the model's aggregation (see the module doc)."""
    if surrogate == "logits":
        return local_logits.mean(dim=(2, 3))
    if surrogate != "relaxed_votes":
        raise ValueError(f"unknown surrogate {surrogate!r}; expected one of {SURROGATES}")
    name = get_aggregation(aggregation).name
    if name == "votes":
        return torch.sigmoid(local_logits / temperature).sum(dim=(2, 3))
    if name == "majority":
        return torch.softmax(local_logits / temperature, dim=1).sum(dim=(2, 3))
    if name == "clipped":
        return torch.tanh(0.05 * local_logits - 1.0).sum(dim=(2, 3))
    raise AssertionError(name)


def class_margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores[y] - max_{c != y} scores[c]`` per row ([B, C] -> [B])."""
    own = scores.gather(1, labels.view(-1, 1)).squeeze(1)
    other = scores.scatter(1, labels.view(-1, 1), float("-inf") if scores.is_floating_point() else torch.iinfo(scores.dtype).min)
    return own - other.max(dim=1).values


def _num_positions(image_size, patch_size):
    H, W = image_size
    ph, pw = patch_size
    return H - ph + 1, W - pw + 1


def random_positions(n: int, image_size, patch_size, k: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """long [n, k', 2]: k' = min(k, number of positions) distinct random top-left positions per image."""
    nr, nc = _num_positions(image_size, parse_patch_size(patch_size))
    total = nr * nc
    k = min(k, total)
    idx = torch.rand(n, total, generator=generator, device=generator.device).argsort(dim=1)[:, :k].to(device)
    return torch.stack([idx // nc, idx % nc], dim=2)


def adaptive_positions(model, images, labels, patch_size, k: int, generator: torch.Generator, batch_size: int = 64) -> torch.Tensor:
    """long [n, k', 2]: the k' = min(k, #positions) positions with the smallest certificate margin per image
    (the model's aggregation), ties broken at random. The model must be in eval mode."""
    ph, pw = parse_patch_size(patch_size)
    cert = certify(model, images, labels, (ph, pw), batch_size=batch_size, return_position_margins=True)
    pm = cert.position_margins.flatten(1)  # [n, positions], row-major over (top, left)
    n, total = pm.shape
    nc = cert.position_margins.shape[2]
    k = min(k, total)
    # random order first, then a stable sort by margin: equal margins come out in random order
    perm = torch.rand(n, total, generator=generator, device=generator.device).argsort(dim=1).to(pm.device)
    order = pm.gather(1, perm).argsort(dim=1, stable=True)[:, :k]
    idx = perm.gather(1, order).to(images.device)
    return torch.stack([idx // nc, idx % nc], dim=2)


class PatchPGD(PatchAttack):
    """Per-image masked PGD on a rectangular patch.

    Args:
        patch_size: int or (height, width) in pixels (or give it to the call).
        steps: sign-gradient steps per location (150).
        step_size: step in [0, 1] pixel units (0.05).
        locations: patch positions tried per image (80).
        placement: ``"random"`` (distinct uniform positions) or ``"adaptive"`` (smallest certificate margin).
        random_start: start the patch from uniform noise (else from the image's own pixels).
        surrogate: ``"relaxed_votes"`` or ``"logits"`` (module doc).
        temperature: T of the relaxed votes.
        batch_size: images attacked together.
        location_chunk: locations per image run in one batch (batch_size * location_chunk images per forward).
        early_stop: stop an image at its first success.
        seed: seed of the attack's own generator (positions, random start).
    """

    def __init__(
        self,
        patch_size=None,
        steps: int = 150,
        step_size: float = 0.05,
        locations: int = 80,
        *,
        placement: str = "random",
        random_start: bool = True,
        surrogate: str = "relaxed_votes",
        temperature: float = 1.0,
        batch_size: int = 16,
        location_chunk: int = 8,
        early_stop: bool = True,
        seed: int = 0,
    ):
        super().__init__(patch_size, seed=seed, batch_size=batch_size)
        self.steps = check_int("steps", steps, minimum=0)
        self.locations = check_int("locations", locations)
        self.location_chunk = check_int("location_chunk", location_chunk)
        self.step_size = check_positive("step_size", step_size)
        self.placement = check_choice("placement", placement, PLACEMENTS)
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.temperature = check_positive("temperature", temperature)
        self.random_start, self.early_stop = bool(random_start), bool(early_stop)
        self.name = "pgd" if placement == "random" else "pgd-adaptive"

    def settings(self) -> dict:
        return dict(
            super().settings(),
            steps=self.steps,
            step_size=self.step_size,
            locations=self.locations,
            placement=self.placement,
            random_start=self.random_start,
            surrogate=self.surrogate,
            temperature=self.temperature,
        )

    def select_positions(self, model, images, labels, patch_size, generator) -> torch.Tensor:
        """long [n, k, 2] top-left positions to try per image (k = min(locations, number of positions))."""
        patch_size = parse_patch_size(patch_size)
        if self.placement == "adaptive":
            return adaptive_positions(model, images, labels, patch_size, self.locations, generator, self.batch_size * self.location_chunk)
        return random_positions(images.shape[0], images.shape[-2:], patch_size, self.locations, generator, images.device)

    def _attack(self, model, images, labels, patch_size, generator):
        N, _, H, W = images.shape
        dev = images.device
        agg = get_aggregation(getattr(model, "aggregation", "votes"))
        pos = self.select_positions(model, images, labels, patch_size, generator)  # [N, L, 2]
        L = pos.shape[1]
        best_adv = images.clone()
        best_pos = pos[:, 0].clone()
        best_rm = torch.full((N,), float("inf"), dtype=torch.float64, device=dev)  # real (vote) margin
        best_sm = torch.full((N,), float("inf"), dtype=torch.float64, device=dev)  # surrogate margin (tie-break)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        success_step = torch.full((N,), -1, dtype=torch.long, device=dev)
        forwards = 0
        for i0 in range(0, N, self.batch_size):
            batch = torch.arange(i0, min(i0 + self.batch_size, N), device=dev)
            for l0 in range(0, L, self.location_chunk):
                act = batch[~done[batch]]
                if act.numel() == 0:
                    break
                K = min(self.location_chunk, L - l0)
                item_pos = pos[act, l0 : l0 + K].reshape(-1, 2)  # image-major: items of image act[a] are a*K .. a*K+K-1
                owner = act.repeat_interleave(K)
                x0, y = images[owner], labels[owner]
                mask = rectangle_masks((H, W), patch_size, item_pos) > 0
                if self.random_start:
                    p = torch.rand(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(dev)
                else:
                    p = x0.clone()
                for step in range(self.steps + 1):
                    p.requires_grad_(True)
                    xa = torch.where(mask, p, x0)
                    z = model.local_logits(xa)
                    forwards += xa.shape[0]
                    sm = class_margin(surrogate_scores(z, agg, self.surrogate, self.temperature), y)
                    with torch.no_grad():
                        real = agg.class_scores(z.detach())
                        rm = class_margin(real.double(), y)
                        succ = real.argmax(dim=1) != y
                        keep = self._update(xa.detach(), item_pos, owner, K, rm, sm.detach().double(), succ, step,
                                            best_adv, best_pos, best_rm, best_sm, done, success_step)
                    if step == self.steps or (self.early_stop and not keep.any()):
                        break
                    (grad,) = torch.autograd.grad(sm.sum(), p)
                    with torch.no_grad():
                        p = (p.detach() - self.step_size * grad.sign()).clamp_(0.0, 1.0)
                        if self.early_stop and not keep.all():  # drop the items of images that already succeeded
                            p, x0, y, mask, owner, item_pos = (t[keep] for t in (p, x0, y, mask, owner, item_pos))
        masks = rectangle_masks((H, W), patch_size, best_pos)
        steps_done = success_step[success_step >= 0]
        info = {
            "positions_per_image": int(L),
            "forward_passes": int(forwards),
            "mean_steps_to_success": float(steps_done.float().mean()) if steps_done.numel() else None,
        }
        return best_adv, masks, best_pos, info

    def _update(self, xa, item_pos, owner, K, rm, sm, succ, step, best_adv, best_pos, best_rm, best_sm, done, success_step):
        """Record the first success of each image, else its lowest (real margin, surrogate margin) so far.

        Returns the bool [items] of items whose image is still not broken."""
        A = owner.numel() // K
        img = owner.view(A, K)[:, 0]
        s2 = succ.view(A, K) & ~done[img].view(A, 1)
        newly = s2.any(dim=1)
        if newly.any():
            first = s2.float().argmax(dim=1)  # first successful location of each image
            rows = newly.nonzero().flatten()
            items = rows * K + first[rows]
            tgt = img[rows]
            best_adv[tgt] = xa[items]
            best_pos[tgt] = item_pos[items]
            done[tgt] = True
            success_step[tgt] = step
        rm2, sm2 = rm.view(A, K), sm.view(A, K)
        rmin = rm2.min(dim=1).values
        pick = torch.where(rm2 == rmin[:, None], sm2, torch.full_like(sm2, float("inf"))).argmin(dim=1)
        items = torch.arange(A, device=owner.device) * K + pick
        cand_rm, cand_sm = rm[items], sm[items]
        better = ~done[img] & ((cand_rm < best_rm[img]) | ((cand_rm == best_rm[img]) & (cand_sm < best_sm[img])))
        if better.any():
            tgt = img[better]
            best_adv[tgt] = xa[items[better]]
            best_pos[tgt] = item_pos[items[better]]
            best_rm[tgt] = cand_rm[better]
            best_sm[tgt] = cand_sm[better]
        return ~done[owner]
