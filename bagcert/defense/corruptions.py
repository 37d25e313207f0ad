"""Common corruptions at 5 severities on float images in [0, 1], and an L-inf PGD attack.

Modelled on the corruption families of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich, ICLR 2019),
re-implemented here from their descriptions with our own parameter tables (``SEVERITY_PARAMS``);
numbers measured with them are not comparable to published -C benchmark numbers.

Every corruption is ``f(x, severity, seed=0) -> x'``: ``x`` float [B, 3, H, W] in [0, 1] (uint8
is divided by 255), ``severity`` an int 1..5, output float32 in [0, 1] of the same shape; the
input is never modified. Random corruptions draw from a ``torch.Generator`` seeded with ``seed``
(same seed -> identical output); deterministic ones ignore it. Severity increases the strength
parameter monotonically:

============== ============================================= ==============================
name           what                                          parameter (severity 1 .. 5)
============== ============================================= ==============================
gaussian_noise x + N(0, std^2), clipped                      std 0.04 0.06 0.08 0.09 0.10
shot_noise     Poisson(x * lam) / lam, clipped               lam 500 250 100 75 50
impulse_noise  each value set to 0 or 1 (half each) w.p. a   a 0.01 0.02 0.03 0.05 0.07
gaussian_blur  Gaussian kernel, replicate border             sigma (px at 32) 0.4 0.6 0.7 0.8 1.0
defocus_blur   disk kernel, weight clip(r + 0.5 - d, 0, 1)   r (px at 32) 0.75 1.0 1.25 1.5 2.0
brightness     x + b, clipped                                b 0.1 0.2 0.3 0.4 0.5
contrast       (x - mean) * c + mean (mean per image)        c 0.75 0.5 0.4 0.3 0.15
jpeg           PIL JPEG round trip of the uint8 image        quality 80 65 58 50 40
pixelate       mean over round(f H) x round(f W) cells       f 0.95 0.9 0.85 0.75 0.65
============== ============================================= ==============================

Blur sizes are given for 32-pixel images and scale with the shorter image side (``s / 32``).
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .common import as_float_images, check_labels

__all__ = [
    "CORRUPTIONS",
    "SEVERITY_PARAMS",
    "corrupt",
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "defocus_blur",
    "brightness",
    "contrast",
    "jpeg",
    "pixelate",
    "linf_pgd",
]

SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": (0.75, 1.0, 1.25, 1.5, 2.0),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}


def _prepare(x: torch.Tensor, severity: int, name: str):
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    x = as_float_images(x).float()
    if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("images must be finite and lie in [0, 1]")
    return x, SEVERITY_PARAMS[name][int(severity) - 1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _scale(x: torch.Tensor) -> float:
    return min(x.shape[-2:]) / 32.0


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filtering with replicate padding (kernel [k, k], odd k, normalised to sum 1)."""
    kernel = (kernel / kernel.sum()).to(x.dtype)
    k = kernel.shape[-1]
    pad = k // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    weight = kernel.expand(x.shape[1], 1, k, k).contiguous()
    return F.conv2d(xp, weight, groups=x.shape[1])


def gaussian_noise(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, std = _prepare(x, severity, "gaussian_noise")
    return (x + std * torch.randn(x.shape, generator=_gen(seed))).clamp_(0.0, 1.0)


def shot_noise(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, lam = _prepare(x, severity, "shot_noise")
    return (torch.poisson(x * lam, generator=_gen(seed)) / lam).clamp_(0.0, 1.0)


def impulse_noise(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, amount = _prepare(x, severity, "impulse_noise")
    g = _gen(seed)
    hit = torch.rand(x.shape, generator=g) < amount
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def gaussian_blur(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, sigma = _prepare(x, severity, "gaussian_blur")
    sigma = sigma * _scale(x)
    radius = max(1, math.ceil(3 * sigma))
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(d**2) / (2 * sigma**2))
    return _filter(x, torch.outer(g, g).float()).clamp_(0.0, 1.0)


def defocus_blur(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, r = _prepare(x, severity, "defocus_blur")
    r = r * _scale(x)
    radius = math.ceil(r + 0.5)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    dist = torch.sqrt(d.view(-1, 1) ** 2 + d.view(1, -1) ** 2)
    disk = (r + 0.5 - dist).clamp(0.0, 1.0)  # anti-aliased disk of radius r
    return _filter(x, disk.float()).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, b = _prepare(x, severity, "brightness")
    return (x + b).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    x, c = _prepare(x, severity, "contrast")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp_(0.0, 1.0)


def jpeg(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    from PIL import Image

    x, quality = _prepare(x, severity, "jpeg")
    arr = (x * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).to(x.device)


def _cell_average(n: int, cells: int) -> torch.Tensor:
    """[n, n] matrix averaging each pixel over its cell: pixel p is in cell ``p * cells // n``."""
    idx = (torch.arange(n) * cells) // n
    same = (idx.view(-1, 1) == idx.view(1, -1)).float()
    return same / same.sum(dim=1, keepdim=True)


def pixelate(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    # the image is cut into round(f H) x round(f W) cells (pixel p in cell p * cells // H) and every
    # pixel takes its cell's mean: downsampling and upsampling on the same partition, so a
    # smaller f always means larger cells (interpolate(area) + interpolate(nearest) use different
    # partitions for non-integer factors, which makes the distortion jump around with f)
    x, f = _prepare(x, severity, "pixelate")
    h, w = x.shape[-2:]
    rows = _cell_average(h, max(1, round(h * f))).to(x.device)
    cols = _cell_average(w, max(1, round(w * f))).to(x.device)
    return (rows @ x @ cols.t()).clamp_(0.0, 1.0)


CORRUPTIONS: dict[str, Callable] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "brightness": brightness,
    "contrast": contrast,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def corrupt(x: torch.Tensor, name: str, severity: int = 1, seed: int = 0) -> torch.Tensor:
    """Apply the corruption ``name`` (a key of :data:`CORRUPTIONS`) at ``severity`` 1..5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](x, severity, seed)


def linf_pgd(
    model_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y,
    eps: float,
    steps: int,
    step: float,
    random_start: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Untargeted L-inf PGD on the cross-entropy of ``model_logits_fn`` (Madry et al. 2018).

    Start at ``x`` plus uniform noise in [-eps, eps] (``random_start``), then ``steps`` signed
    gradient ascent steps of size ``step``, each followed by projection onto the eps-ball around
    ``x`` and onto [0, 1]. Returns the detached adversarial images (the last iterate). Only the
    input receives gradients; a module passed as ``model_logits_fn`` is not switched to eval mode
    here (do it before calling).
    """
    x0 = as_float_images(x).detach()
    y = check_labels(y, x0.shape[0]).to(x0.device)
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, steps and step must be >= 0, got eps={eps}, steps={steps}, step={step}")
    if eps == 0:
        return x0.clone()
    lo, hi = (x0 - eps).clamp(0.0, 1.0), (x0 + eps).clamp(0.0, 1.0)
    if random_start:
        noise = (2 * torch.rand(x0.shape, generator=_gen(seed)) - 1).to(x0.device, x0.dtype) * eps
        x_adv = torch.max(torch.min(x0 + noise, hi), lo)
    else:
        x_adv = x0.clone()
    for _ in range(int(steps)):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model_logits_fn(x_adv).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        with torch.no_grad():
            x_adv = torch.max(torch.min(x_adv + step * grad.sign(), hi), lo)  # projection: eps-ball and [0, 1]
    return x_adv.detach()
