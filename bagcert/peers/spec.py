"""Peer specs: which model-agnostic peer a base classifier is trained for (``train.py --peer``).

A spec is a short string ``METHOD:ARG[,key=value,...]``:

* ``drs-column:B`` / ``drs-block:B``: de-randomized smoothing with column bands of width B (block:
  B x B blocks). Keys: ``encoding`` (``mask`` default, ``levine_feizi``, ``fill``) and ``fill`` (the
  ablated-pixel value of the ``fill`` encoding, default 0.5).
* ``patchcleanser:P``: PatchCleanser with the mask set made for P x P patches (``HxW`` for a
  rectangle). Keys: ``k`` (masks per axis, default 6, or ``RxC``), ``masks`` (masks drawn per
  training image from the set, default 2: the certificate needs every two-mask image right) and
  ``fill`` (the masked-pixel value, default 0.5; the certifier must use the same one).

:class:`PeerSpec` turns a spec into everything training and certification need: the base classifier
(:meth:`PeerSpec.build_classifier`), the training transform (:meth:`PeerSpec.transform`, the same
encoding / mask set / fill as at certification time) and the certifier (:meth:`PeerSpec.certifier`).
``bagcert.training.train`` records ``to_dict()`` in the saved peer classifier's metadata under
``"peer"``; :func:`load_peer_certifier` rebuilds classifier and certifier from that file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..geometry import parse_patch_size
from .patchcleanser import MaskSet, PatchCleanser
from .smoothing import ENCODINGS, AblatedInput, DerandomizedSmoothing
from .training_transforms import random_ablation, random_masks

__all__ = ["PeerSpec", "parse_peer_spec", "load_peer_certifier", "PEER_METHODS"]

PEER_METHODS = ("drs-column", "drs-block", "patchcleanser")
_EXAMPLES = "e.g. 'drs-column:4', 'drs-block:12,encoding=levine_feizi', 'patchcleanser:5', 'patchcleanser:5,k=6,masks=2'"
_KEYS = {"drs": ("encoding", "fill"), "patchcleanser": ("k", "masks", "fill")}


def _pair(text: str, what: str, spec: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"peer spec {spec!r}: {what} must be a positive int or HxW, got {text!r}")
    vals = [int(p) for p in parts]
    if min(vals) < 1:
        raise ValueError(f"peer spec {spec!r}: {what} must be >= 1, got {text!r}")
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


@dataclass(frozen=True)
class PeerSpec:
    """A parsed peer spec (see the module doc). Build one with :meth:`parse` or :meth:`from_dict`."""

    method: str  # "drs" or "patchcleanser"
    mode: str | None = None  # drs: "column" or "block"
    band_size: int | None = None  # drs
    encoding: str = "mask"  # drs
    patch_size: tuple[int, int] | None = None  # patchcleanser
    k: tuple[int, int] = (6, 6)  # patchcleanser
    num_masks: int = 2  # patchcleanser
    fill: float = 0.5

    @classmethod
    def parse(cls, text: str) -> "PeerSpec":
        if not isinstance(text, str) or ":" not in text:
            raise ValueError(f"peer spec {text!r} is not METHOD:ARG[,key=value...] with METHOD one of {PEER_METHODS}; {_EXAMPLES}")
        head, rest = text.strip().split(":", 1)
        head = head.strip().lower()
        if head not in PEER_METHODS:
            raise ValueError(f"peer spec {text!r}: unknown method {head!r}; expected one of {PEER_METHODS} ({_EXAMPLES})")
        arg, *opts = [t.strip() for t in rest.split(",")]
        method = "drs" if head.startswith("drs") else "patchcleanser"
        kv = {}
        for o in opts:
            if "=" not in o:
                raise ValueError(f"peer spec {text!r}: option {o!r} is not key=value ({_EXAMPLES})")
            key, val = (t.strip() for t in o.split("=", 1))
            if key not in _KEYS[method]:
                raise ValueError(f"peer spec {text!r}: unknown option {key!r} for {head}; allowed: {', '.join(_KEYS[method])}")
            if key in kv:
                raise ValueError(f"peer spec {text!r}: option {key!r} given twice")
            kv[key] = val
        fill = 0.5
        if "fill" in kv:
            try:
                fill = float(kv["fill"])
            except ValueError:
                raise ValueError(f"peer spec {text!r}: fill must be a number in [0, 1], got {kv['fill']!r}") from None
            if not 0.0 <= fill <= 1.0:
                raise ValueError(f"peer spec {text!r}: fill must lie in [0, 1], got {fill}")
        if method == "drs":
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"peer spec {text!r}: the band size must be a positive int, got {arg!r} ({_EXAMPLES})")
            encoding = kv.get("encoding", "mask")
            if encoding not in ENCODINGS:
                raise ValueError(f"peer spec {text!r}: unknown encoding {encoding!r}; expected one of {ENCODINGS}")
            if "fill" in kv and encoding != "fill":
                raise ValueError(f"peer spec {text!r}: fill applies only to encoding=fill")
            return cls("drs", mode=head.split("-", 1)[1], band_size=int(arg), encoding=encoding, fill=fill)
        patch = _pair(arg, "the patch size", text)
        k = _pair(kv.get("k", "6"), "k", text)
        masks = kv.get("masks", "2")
        if not masks.isdigit() or int(masks) < 1:
            raise ValueError(f"peer spec {text!r}: masks must be a positive int, got {masks!r}")
        return cls("patchcleanser", patch_size=patch, k=k, num_masks=int(masks), fill=fill)

    # -- serialisation ------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.method == "drs":
            s = f"drs-{self.mode}:{self.band_size},encoding={self.encoding}"
            return s + (f",fill={self.fill!r}" if self.encoding == "fill" else "")
        p = f"{self.patch_size[0]}" if self.patch_size[0] == self.patch_size[1] else f"{self.patch_size[0]}x{self.patch_size[1]}"
        k = f"{self.k[0]}" if self.k[0] == self.k[1] else f"{self.k[0]}x{self.k[1]}"
        return f"patchcleanser:{p},k={k},masks={self.num_masks},fill={self.fill!r}"

    def to_dict(self) -> dict:
        """The fields that apply to the method, plus ``spec``, the canonical string (builtins only)."""
        keys = ("method", "mode", "band_size", "encoding") if self.method == "drs" else ("method", "patch_size", "k", "num_masks")
        d = asdict(self)
        out = {key: (list(d[key]) if isinstance(d[key], tuple) else d[key]) for key in keys}
        if self.method == "patchcleanser" or self.encoding == "fill":
            out["fill"] = self.fill
        out["spec"] = str(self)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PeerSpec":
        if not isinstance(d, dict) or "spec" not in d:
            raise ValueError(f"not a peer spec record (no 'spec' entry): {d!r}")
        return cls.parse(d["spec"])

    # -- what a spec builds ----------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return AblatedInput(self.encoding, self.fill).channels if self.method == "drs" else 3

    def check_image_size(self, image_size) -> None:
        """Raise ValueError if the spec cannot apply to images of ``image_size`` (int or (H, W))."""
        H, W = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if self.method == "drs":
            side = W if self.mode == "column" else min(H, W)
            if self.band_size > side:
                raise ValueError(f"peer {self}: band size {self.band_size} is larger than the {H}x{W} image")
        else:
            if self.patch_size[0] > H or self.patch_size[1] > W:
                raise ValueError(f"peer {self}: patch {self.patch_size[0]}x{self.patch_size[1]} is larger than the {H}x{W} image")

    def build_classifier(self, backbone: str, num_classes: int, **model_kwargs):
        """The base classifier this peer certifies: a :class:`~bagcert.peers.PooledClassifier`
        (6 input channels for the DRS ``mask`` / ``levine_feizi`` encodings, 3 otherwise)."""
        from .classifiers import PooledClassifier

        return PooledClassifier(backbone, num_classes, in_channels=self.in_channels, **model_kwargs)

    def mask_set(self, image_size) -> MaskSet:
        if self.method != "patchcleanser":
            raise ValueError(f"peer {self} has no mask set")
        return MaskSet.for_patch(tuple(image_size), self.patch_size, self.k)

    def transform(self, x: torch.Tensor, generator: torch.Generator, rows=None, global_size=None) -> torch.Tensor:
        """The training input of the base classifier: a random band / block encoded like at
        certification time (DRS) or ``num_masks`` masks of the certification mask set (PatchCleanser).
        ``rows`` / ``global_size``: see :mod:`bagcert.peers.training_transforms`."""
        if self.method == "drs":
            return random_ablation(
                x, self.band_size, generator, mode=self.mode, encoding=AblatedInput(self.encoding, self.fill),
                rows=rows, global_size=global_size,
            )
        return random_masks(
            x, self.mask_set(x.shape[-2:]), generator, num_masks=self.num_masks, fill=self.fill, rows=rows, global_size=global_size
        )

    def certifier(self, batch_size: int = 512):
        """The certifier with the same band / encoding (DRS) or k / fill (PatchCleanser) as training."""
        if self.method == "drs":
            return DerandomizedSmoothing(self.band_size, self.mode, AblatedInput(self.encoding, self.fill), batch_size=batch_size)
        return PatchCleanser(self.k, self.fill, batch_size=batch_size)


def parse_peer_spec(text: str) -> PeerSpec:
    """``PeerSpec.parse``: raise ValueError with the accepted forms for a bad spec."""
    return PeerSpec.parse(text)


def load_peer_certifier(path, batch_size: int = 512):
    """Load a peer classifier written by ``train.py --peer`` and rebuild its certifier.

    Returns ``(certifier, classifier, metadata)``; ``metadata["peer"]["patch_size"]`` is the patch size a
    PatchCleanser classifier was trained for (certify with it: ``certifier.certify(classifier, x, y,
    patch_size)``). A peer classifier without a recorded spec (saved by hand) is refused.
    """
    from ..checkpoint import CheckpointError
    from .classifiers import load_peer_classifier

    clf, meta = load_peer_classifier(path)
    if "peer" not in meta:
        raise CheckpointError(f"{path} records no peer spec (metadata 'peer'); build the certifier by hand")
    spec = PeerSpec.from_dict(meta["peer"])
    if spec.in_channels != clf.in_channels:
        raise CheckpointError(f"{path}: the classifier reads {clf.in_channels} channels but peer {spec} feeds {spec.in_channels}")
    return spec.certifier(batch_size=batch_size), clf, meta
