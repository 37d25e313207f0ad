"""Exact receptive-field geometry of BagNet-style models.

A model is described, along each image axis, by the chain of convolutions on its main path,
each given as ``(kernel, stride, padding)``. Composing them gives three integers:

* ``receptive_field`` r: how many input pixels one output location can see,
* ``stride`` S: the distance in pixels between neighbouring locations,
* ``padding`` P: how far location 0's window starts before pixel 0.

Location ``i`` sees the input pixels ``[i*S - P, i*S - P + r - 1]`` (clipped to the image).
This box is a superset of the pixels that can influence the location, whatever the weights,
because every convolution, residual crop and pooling in the supported models stays inside it.
A superset is what soundness needs: a certificate computed with a larger affected set is
only more conservative.

For a patch covering pixels ``[a, a + L - 1]`` the affected locations along that axis are

    i_lo = max(0, ceil((a + P - r + 1) / S)),   i_hi = min(g - 1, floor((a + L - 1 + P) / S))

(empty when i_lo > i_hi), and the affected set R(l) of a rectangular patch is the product of
the two axis ranges, so |R(l)| = (row count) * (column count). Nothing here assumes square
patches, square images or positions away from the border.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

__all__ = ["ConvSpec", "Geometry", "parse_patch_size", "normalize_patch_sizes", "normalize_image_size", "axis_ranges"]

ConvSpec = tuple  # (kernel, stride, padding)


def patch_side_for_area(percent: float, image_size) -> int:
    """Side of the square patch covering ``percent`` % of an ``(H, W)`` image (rounded to the nearest pixel).

    ImageNet at 224 px: 1 % -> 22 (the literature rounds 22.4 up to 23), 2 % -> 32, 3 % -> 39; at 128 px:
    1 % -> 13, 2 % -> 18, 3 % -> 22. Round half up; at least 1 px.
    """
    import math

    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        raise ValueError(f"patch area must be a percentage in (0, 100], got {percent!r}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return max(1, int(math.floor(math.sqrt(percent / 100.0 * h * w) + 0.5)))


def parse_patch_size(patch_size) -> tuple[int, int]:
    """Normalise a patch size given as ``5``, ``(3, 7)``, ``"5"`` or ``"3x7"`` to ``(height, width)`` in pixels.

    Raises:
        ValueError: a string that is not ``"5"`` / ``"3x7"``, or a side that is not positive.
        TypeError: anything else that is not an int or a (height, width) pair of ints (bools included).
    """
    if isinstance(patch_size, str):
        text = patch_size.strip().lower()
        parts = text.split("x")
        if len(parts) not in (1, 2) or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"patch size {patch_size!r} is not understood: expected an integer like '5' "
                "or a rectangle HEIGHTxWIDTH like '3x7'"
            )
        values = [int(p) for p in parts]
        patch_size = values[0] if len(values) == 1 else tuple(values)
    if isinstance(patch_size, bool):
        raise TypeError(f"patch size must be an int or (height, width), got {patch_size!r}")
    if isinstance(patch_size, int):
        size = (patch_size, patch_size)
    elif isinstance(patch_size, Sequence) and len(patch_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in patch_size
    ):
        size = (int(patch_size[0]), int(patch_size[1]))
    else:
        raise TypeError(f"patch size must be an int or a (height, width) pair of ints, got {patch_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"patch size must be positive, got {size[0]}x{size[1]}")
    return size


def _size_text(size) -> str:
    """A patch size as the user wrote it: strings as typed, everything else as its repr."""
    return size if isinstance(size, str) else repr(size)


def normalize_patch_sizes(patch_sizes) -> list[tuple[int, int]]:
    """Check a list of patch sizes and return them as ``[(height, width), ...]`` in the given order.

    Each entry is anything :func:`parse_patch_size` accepts (``5``, ``(3, 7)``, ``"5"``, ``"3x7"``).

    Raises:
        TypeError: ``patch_sizes`` is not a list or tuple (a lone ``5`` or ``"3x7"``: pass ``[5]`` or
            ``["3x7"]``, or use ``patch_size=`` for a single size), or an entry is not a patch size.
        ValueError: the list is empty, an entry is not a positive size, or two entries give the same size
            (``[5, 5]``, ``[5, (5, 5)]``, ``["5", "5x5"]``): the message names the duplicates.
    """
    if isinstance(patch_sizes, (str, bytes, int)) or not isinstance(patch_sizes, (list, tuple)):
        hint = f"; for a single size pass patch_size={patch_sizes!r} instead" if isinstance(patch_sizes, (int, str)) else ""
        raise TypeError(
            f"patch_sizes must be a list of patch sizes such as [5] or [1, 2, (3, 7)], got {patch_sizes!r} "
            f"({type(patch_sizes).__name__}){hint}"
        )
    if len(patch_sizes) == 0:
        raise ValueError("patch_sizes is empty; give at least one size, e.g. [5] or [1, 2, (3, 7)]")
    sizes = [parse_patch_size(p) for p in patch_sizes]
    groups: dict[tuple[int, int], list] = {}
    for given, size in zip(patch_sizes, sizes):
        groups.setdefault(size, []).append(given)
    dups = [(size, given) for size, given in groups.items() if len(given) > 1]
    if dups:
        text = "; ".join(f"{', '.join(_size_text(g) for g in given)} all mean {h}x{w}" for (h, w), given in dups)
        raise ValueError(f"duplicate patch sizes: {text}; give each size once")
    return sizes


def normalize_image_size(image_size) -> tuple[int, int]:
    """Check an image size and return it as ``(height, width)`` in pixels.

    Raises:
        TypeError: ``image_size`` is not a (height, width) pair of ints (a lone ``32`` included: pass ``(32, 32)``).
        ValueError: a side is not positive.
    """
    import operator

    if isinstance(image_size, (str, bytes)) or not isinstance(image_size, (Sequence, torch.Size)) or len(image_size) != 2:
        hint = f"; for a square image pass ({image_size}, {image_size})" if isinstance(image_size, int) else ""
        raise TypeError(f"image_size must be a (height, width) pair of ints, got {image_size!r}{hint}")
    try:
        if any(isinstance(v, bool) for v in image_size):
            raise TypeError
        H, W = (operator.index(v) for v in image_size)
    except TypeError:
        raise TypeError(f"image_size must be a (height, width) pair of ints, got {image_size!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"image_size must be positive, got {H}x{W}")
    return H, W


def _pair(value, what: str) -> tuple[int, int]:
    """``5`` or ``(5, 7)`` as an ``(rows, cols)`` pair of ints (bools refused)."""
    import operator

    vals = value if isinstance(value, (tuple, list)) else (value, value)
    try:
        if len(vals) != 2 or any(isinstance(v, bool) for v in vals):
            raise TypeError
        return int(operator.index(vals[0])), int(operator.index(vals[1]))
    except TypeError:
        raise TypeError(f"{what} must be an int or a (rows, cols) pair of ints, got {value!r}") from None


@dataclass(frozen=True)
class Geometry:
    """Receptive-field geometry along both axes (rows first).

    Location ``(i, j)`` sees the pixel rows ``[i*stride[0] - padding[0], i*stride[0] - padding[0] + receptive_field[0] - 1]``
    and the same for the columns with index 1 (clipped to the image). Three ways to build one:

    * ``Geometry.from_layers([(kernel, stride, padding), ...])``: compose the convolution chain of the model's
      main path; each entry may give ``(rows, cols)`` pairs for rectangular kernels, strides or paddings. The
      chain also gives the grid size of any image (``grid_size``) and the smallest usable image.
    * ``Geometry(receptive_field, stride, padding)`` with ints or ``(rows, cols)`` pairs and no chain: the grid
      size is then taken from the local-logit map when certifying (``certify`` / ``certify_logits``), or
      fixed with :meth:`at_grid`.
    * :func:`bagcert.infer_geometry` traces a module and returns the exact geometry for one image size.

    Attributes:
        receptive_field, stride, padding: ``(rows, cols)`` pairs of ints in pixels (ints are accepted and
            duplicated). ``receptive_field >= 1``, ``stride >= 1``; ``padding`` may be negative (a location's
            window starting inside the image).
        layers: the chain given to :meth:`from_layers` (``()`` when none): entries ``(k, s, p)`` of ints
            (square) or of ``(rows, cols)`` pairs.
        grid: ``((H, W), (h, w))``: the known grid of one image size, or None.

    Raises:
        TypeError / ValueError: values that are not ints or pairs of ints; a receptive field or stride below 1.
    """

    receptive_field: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    layers: tuple = ()  # main-path conv chain (kernel, stride, padding); ints (square) or (rows, cols) pairs
    grid: tuple | None = None  # ((H, W), (h, w)): the grid of one image size, for geometries without a chain

    def __post_init__(self):
        rf, st, pad = (_pair(self.receptive_field, "receptive_field"), _pair(self.stride, "stride"),
                       _pair(self.padding, "padding"))
        if min(rf) < 1:
            raise ValueError(f"receptive_field must be >= 1 pixel along both axes, got {rf}")
        if min(st) < 1:
            raise ValueError(f"stride must be >= 1 pixel along both axes, got {st}")
        object.__setattr__(self, "receptive_field", rf)
        object.__setattr__(self, "stride", st)
        object.__setattr__(self, "padding", pad)
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.grid is not None:
            (H, W), (h, w) = self.grid
            object.__setattr__(self, "grid", ((int(H), int(W)), (int(h), int(w))))

    @classmethod
    def from_layers(cls, layers: Iterable[ConvSpec]) -> "Geometry":
        """Compose a chain of convolutions ``(kernel, stride, padding)`` (pooling layers count as convolutions).

        Each of kernel, stride and padding is an int (both axes) or a ``(rows, cols)`` pair, e.g.
        ``[(7, 2, 3), ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))]``. A dilated kernel counts as
        ``dilation * (kernel - 1) + 1``. Padding is applied on both sides (PyTorch's ``padding=``).
        """
        norm = []
        for entry in layers:
            k, s, p = entry
            k, s, p = _pair(k, "kernel"), _pair(s, "stride"), _pair(p, "padding")
            if min(k) < 1 or min(s) < 1:
                raise ValueError(f"layer {entry!r}: kernel and stride must be >= 1")
            square = k[0] == k[1] and s[0] == s[1] and p[0] == p[1]
            norm.append((k[0], s[0], p[0]) if square else (k, s, p))
        layers = tuple(norm)
        rf, st, pad = [], [], []
        for axis in (0, 1):
            r, j, start = 1, 1, 0
            for k, s, p in _axis_chain(layers, axis):
                # a kernel of size k at stride s on a grid of jump j widens the window by (k-1)*j
                r += (k - 1) * j
                start -= p * j
                j *= s
            rf.append(r), st.append(j), pad.append(-start)
        return cls(tuple(rf), tuple(st), tuple(pad), layers)

    def at_grid(self, image_size, grid_size) -> "Geometry":
        """This geometry with its grid fixed to ``grid_size`` (h, w) locations for ``image_size`` (H, W) pixels.

        Raises:
            ValueError: the geometry has a layer chain that gives another grid for this image size.
        """
        H, W = normalize_image_size(image_size)
        h, w = (int(v) for v in grid_size)
        if self.layers and self.grid_size(H, W) != (h, w):
            raise ValueError(
                f"the layer chain gives {self.grid_size(H, W)} locations for a {H}x{W} image, not {(h, w)}"
            )
        return replace(self, grid=((H, W), (h, w)))

    def knows_grid(self, height: int, width: int) -> bool:
        """Whether :meth:`grid_size` can answer for this image size (a layer chain, or the grid fixed for it)."""
        return bool(self.layers) or (self.grid is not None and self.grid[0] == (int(height), int(width)))

    def for_map(self, image_size, map_size) -> "Geometry":
        """This geometry for a local map of ``map_size`` (h, w) locations on ``image_size`` (H, W) images: one that
        knows its grid must give ``map_size`` (else ValueError); one without a chain takes the map's grid."""
        H, W = normalize_image_size(image_size)
        h, w = (int(v) for v in map_size)
        if self.knows_grid(H, W):
            if self.grid_size(H, W) != (h, w):
                raise ValueError(
                    f"local map is {h}x{w} but the geometry gives {self.grid_size(H, W)} locations for a {H}x{W} image: "
                    "map and image size do not belong together"
                )
            return self
        return self.at_grid((H, W), (h, w))

    # --- output grid -------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Number of output locations along each axis for an input of this size.

        Raises:
            ValueError: the geometry has no layer chain and no grid for this image size (build it with
                :meth:`from_layers`, fix it with :meth:`at_grid`, or certify, which takes the grid from the
                local-logit map).
        """
        if not self.layers:
            if self.grid is not None and self.grid[0] == (int(height), int(width)):
                return self.grid[1]
            known = f" (it knows the grid of {self.grid[0][0]}x{self.grid[0][1]} images only)" if self.grid else ""
            raise ValueError(
                f"this geometry has no layer chain, so the grid size of a {height}x{width} image is unknown{known}; "
                "build it with Geometry.from_layers(...), fix it with geometry.at_grid(image_size, (h, w)), or certify, "
                "which takes the grid from the local-logit map"
            )
        return (self._axis_grid(height, 0), self._axis_grid(width, 1))

    def _axis_grid(self, n: int, axis: int = 0) -> int:
        for k, s, p in _axis_chain(self.layers, axis):
            n = (n + 2 * p - k) // s + 1
            if n <= 0:
                return 0
        return n

    def min_input_size(self) -> int:
        """Smallest square input that yields at least one output location (1 without a layer chain)."""
        if not self.layers:
            return 1
        n = 1
        while self._axis_grid(n, 0) < 1 or self._axis_grid(n, 1) < 1:
            n += 1
        return n

    # --- pixel boxes -------------------------------------------------------------------
    def pixel_box(self, i: int, j: int, image_size: tuple[int, int] | None = None):
        """Pixel box ``(top, left, bottom, right)`` (inclusive) seen by location (i, j).

        With ``image_size`` the box is clipped to the image; it can then be empty for locations
        of padded models whose window lies entirely in the padding (never for the models here).
        """
        top = i * self.stride[0] - self.padding[0]
        left = j * self.stride[1] - self.padding[1]
        bottom = top + self.receptive_field[0] - 1
        right = left + self.receptive_field[1] - 1
        if image_size is not None:
            top, left = max(top, 0), max(left, 0)
            bottom, right = min(bottom, image_size[0] - 1), min(right, image_size[1] - 1)
        return top, left, bottom, right

    def affected_ranges(self, image_size, patch_size, positions=None):
        """Affected location ranges for every patch position.

        Returns ``(rows, cols)`` where ``rows`` is a long tensor [n_pos_rows, 2] of inclusive
        ``(i_lo, i_hi)`` per top pixel row of the patch (``i_hi = i_lo - 1`` encodes an empty range),
        and ``cols`` the same for the columns.
        """
        ph, pw = parse_patch_size(patch_size)
        H, W = normalize_image_size(image_size)
        if ph > H or pw > W:
            raise ValueError(f"patch {ph}x{pw} is larger than the {H}x{W} image; patches must fit inside the image")
        gh, gw = self.grid_size(H, W)
        rows = axis_ranges(H, ph, gh, self.receptive_field[0], self.stride[0], self.padding[0])
        cols = axis_ranges(W, pw, gw, self.receptive_field[1], self.stride[1], self.padding[1])
        return rows, cols

    def max_affected(self, image_size, patch_size) -> int:
        """Largest |R(l)| over all positions of the patch: the locations one patch can reach at worst.

        The certificate asks the votes outside R(l) to beat every other class by more than |R(l)|.
        When the locations inside R(l) vote for the label, as they mostly do on correctly classified
        images, the margin over all N locations must therefore exceed ``2 * max_affected``: the share
        ``2 * max_affected / N`` says how far a model's vote margins must reach.
        """
        rows, cols = self.affected_ranges(image_size, patch_size)
        n_rows = (rows[:, 1] - rows[:, 0] + 1).max()
        n_cols = (cols[:, 1] - cols[:, 0] + 1).max()
        return int(n_rows * n_cols)

    def affected_mask(self, image_size, patch_size, top: int, left: int) -> torch.Tensor:
        """Boolean [h, w] mask of the locations R(l) affected by the patch at (top, left)."""
        ph, pw = parse_patch_size(patch_size)
        H, W = normalize_image_size(image_size)
        if not (0 <= top <= H - ph and 0 <= left <= W - pw):
            raise ValueError(
                f"patch {ph}x{pw} at ({top}, {left}) is not fully inside the {H}x{W} image"
            )
        rows, cols = self.affected_ranges(image_size, (ph, pw))
        gh, gw = self.grid_size(H, W)
        mask = torch.zeros(gh, gw, dtype=torch.bool)
        r0, r1 = rows[top].tolist()
        c0, c1 = cols[left].tolist()
        if r1 >= r0 and c1 >= c0:
            mask[r0 : r1 + 1, c0 : c1 + 1] = True
        return mask

    def to_dict(self) -> dict:
        return {
            "receptive_field": list(self.receptive_field),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }


def _axis_chain(layers, axis: int):
    """The ``(kernel, stride, padding)`` ints of every layer along ``axis`` (0 rows, 1 columns)."""
    for k, s, p in layers:
        yield (k[axis] if isinstance(k, tuple) else k, s[axis] if isinstance(s, tuple) else s,
               p[axis] if isinstance(p, tuple) else p)


def axis_ranges(n: int, length: int, grid: int, rf: int, stride: int, padding: int) -> torch.Tensor:
    """Inclusive ranges ``[i_lo, i_hi]`` of locations hit by a patch of ``length`` at each start ``a``.

    ``a`` runs over ``0 .. n - length`` (patches fully inside the image). Empty ranges are encoded
    as ``i_hi = i_lo - 1`` so that integral-image sums over them are exactly zero.
    """
    if length > n:
        raise ValueError(f"patch side {length} is larger than the image side {n}")
    a = torch.arange(0, n - length + 1, dtype=torch.long)
    # location i sees [i*S - P, i*S - P + rf - 1]; it meets [a, a+L-1] iff
    #   i*S - P <= a + L - 1   and   i*S - P + rf - 1 >= a
    lo = torch.div(a + padding - rf + 1 + stride - 1, stride, rounding_mode="floor")  # ceil division
    hi = torch.div(a + length - 1 + padding, stride, rounding_mode="floor")
    lo = lo.clamp(min=0, max=grid)
    hi = hi.clamp(min=-1, max=grid - 1)
    hi = torch.maximum(hi, lo - 1)
    return torch.stack([lo, hi], dim=1)
