"""Aggregations: local logits [B, C, h, w] -> bounded per-location scores -> class scores [B, C].

Every aggregation here is a sum over locations of a per-location score that lies in a known
interval ``[low, high]``. That bound is all the certificate needs: a patch can move each affected
location's score for any class anywhere inside the interval, so it can shift the difference
between two class scores by at most ``(high - low)`` per affected location.

* ``votes`` (BagCert): location votes for class c iff its logit for c is > 0; a location may vote
  for several classes or none. Scores in {0, 1}.
* ``majority``: one vote per location, for its argmax class (ties to the lower class index).
* ``clipped`` (Clipped BagNet, Zhang et al. 2020): ``tanh(a * z + b)`` with a = 0.05, b = -1,
  summed. Scores in (-1, 1).

Predictions are ``argmax`` of the class scores with ties going to the lower class index
(``torch.argmax`` returns the first maximal index).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

__all__ = ["Aggregation", "get_aggregation", "AGGREGATIONS", "predict"]


@dataclass(frozen=True)
class Aggregation:
    name: str
    low: float
    high: float
    exact_integer: bool  # scores are integers: the certificate is evaluated in exact integer arithmetic

    @property
    def spread(self) -> float:
        return self.high - self.low

    def local_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-location scores [B, C, h, w]; int32 for integer aggregations, float64 otherwise.

        Args:
            logits: floating-point local logits [B, C, h, w] (``model.local_logits(x)``).

        Raises:
            ValueError: ``logits`` is not a floating-point 4-D tensor (e.g. pooled [B, C] logits).
        """
        _check_local_logits(logits)
        if self.name == "votes":
            return (logits > 0).to(torch.int32)
        if self.name == "majority":
            idx = logits.argmax(dim=1, keepdim=True)  # first maximum: ties to the lower class
            return torch.zeros_like(logits, dtype=torch.int32).scatter_(1, idx, 1)
        if self.name == "clipped":
            return torch.tanh(0.05 * logits.double() - 1.0)
        raise AssertionError(self.name)

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Aggregated class scores [B, C] (vote counts for integer aggregations) of local logits [B, C, h, w]."""
        return self.local_scores(logits).sum(dim=(2, 3))


def _check_local_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"aggregations take local logits [B, C, h, w] (model.local_logits(x)), got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"local logits must be floating point, got dtype {logits.dtype}")


AGGREGATIONS = {
    "votes": Aggregation("votes", 0.0, 1.0, True),
    "majority": Aggregation("majority", 0.0, 1.0, True),
    "clipped": Aggregation("clipped", -1.0, 1.0, False),
}


def get_aggregation(name: str | Aggregation) -> Aggregation:
    """The :class:`Aggregation` called ``name`` (or ``name`` itself when it already is one).

    Raises:
        ValueError: an unknown name; the message lists the known ones and close matches.
    """
    if isinstance(name, Aggregation):
        return name
    if name not in AGGREGATIONS:
        close = difflib.get_close_matches(str(name), AGGREGATIONS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown aggregation {name!r}{hint}; expected one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def predict(scores: torch.Tensor) -> torch.Tensor:
    """Argmax over classes, ties to the lower class index."""
    return scores.argmax(dim=1)
