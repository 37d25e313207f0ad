"""Draw the receptive-field geometry figure of docs/own_model.md (docs/figures/geometry.png).

Left: the pixel box one output location sees (receptive field r, stride S, padding P). Right: a patch and the set
R(l) of locations it reaches, from ``Geometry.affected_mask``. Everything is computed by bagcert.Geometry.

    python benchmarks/geometry_figure.py --output docs/figures/geometry.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from bagcert.geometry import Geometry  # noqa: E402


def draw(output: Path) -> None:
    # a stride-2 network: 3x3 conv (pad 1), then 3x3 conv at stride 2 (pad 1): r = 5, S = 2, P = 2
    geo = Geometry.from_layers([(3, 1, 1), (3, 2, 1)])
    H = W = 16
    gh, gw = geo.grid_size(H, W)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax in axes:
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_xticks(range(0, W, 2))
        ax.set_yticks(range(0, H, 2))
        ax.set_aspect("equal")
        for k in range(H + 1):
            ax.axhline(k - 0.5, color="0.9", lw=0.5)
            ax.axvline(k - 0.5, color="0.9", lw=0.5)
    r, s, p = geo.receptive_field[0], geo.stride[0], geo.padding[0]
    ax = axes[0]
    i, j = 3, 4
    top, left, bottom, right = geo.pixel_box(i, j)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=True, alpha=0.25, color="tab:blue"))
    cy, cx = i * s - p + (r - 1) / 2, j * s - p + (r - 1) / 2
    ax.plot([cx], [cy], "o", color="tab:blue")
    ax.set_title(fontsize=9, label=f"location ({i}, {j}) sees pixels [{top}, {bottom}] x [{left}, {right}]\n"
                 f"receptive field r = {r}, stride S = {s}, padding P = {p}: box starts at i*S - P")
    ax = axes[1]
    ph = pw = 3
    a, b = 6, 7
    mask = geo.affected_mask((H, W), (ph, pw), a, b)
    for (li, lj) in mask.nonzero().tolist():
        t, l_, _, _ = geo.pixel_box(li, lj)
        ax.plot([l_ + (r - 1) / 2], [t + (r - 1) / 2], "s", color="tab:red", ms=6)
    for li in range(gh):
        for lj in range(gw):
            if not mask[li, lj]:
                t, l_, _, _ = geo.pixel_box(li, lj)
                ax.plot([l_ + (r - 1) / 2], [t + (r - 1) / 2], ".", color="0.6", ms=4)
    ax.add_patch(Rectangle((b - 0.5, a - 0.5), pw, ph, fill=True, alpha=0.5, color="tab:orange"))
    ax.set_title(fontsize=9, label=f"a {ph}x{pw} patch at ({a}, {b}) reaches |R(l)| = {int(mask.sum())} of {gh * gw} locations\n"
                 "(red: locations whose box meets the patch, drawn at their box centre)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=output.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/figures/geometry.png"))
    draw(parser.parse_args().output)
