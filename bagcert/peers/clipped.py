"""One-pass certifiers that already live in :mod:`bagcert.certification`, behind the peer interface.

* :class:`ClippedBagNet` (Zhang et al. 2020): local logits clipped per location with
  ``tanh(0.05 z - 1)`` (interval (-1, 1)) and summed; a patch can move each affected location's
  score for any class anywhere in (-1, 1). Certificate: ``bagcert.certify(..., aggregation="clipped")``.
* :class:`BagCert` (Metzen & Yatsura 2021): binary votes, the package's default certificate; the
  reference point of the peer benchmark.
"""

from __future__ import annotations

import torch

from ..aggregation import get_aggregation
from ..certification import CertResult, certify
from .base import PeerCertifier, as_classifier, check_images_for_peer

__all__ = ["ClippedBagNet", "BagCert"]


class _OnePassAggregation(PeerCertifier):
    aggregation = "votes"

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size

    def certify(self, model_or_fn, images: torch.Tensor, labels, patch_size) -> CertResult:
        as_classifier(model_or_fn)
        res = certify(model_or_fn, images, labels, patch_size, aggregation=self.aggregation, batch_size=self.batch_size)
        res.aggregation = self.name
        return res

    @torch.no_grad()
    def predict(self, model_or_fn, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        model = as_classifier(model_or_fn)
        check_images_for_peer(images)
        agg = get_aggregation(self.aggregation)
        bs = self.batch_size or images.shape[0]
        preds = [agg.class_scores(model.local_logits(images[i : i + bs])).argmax(dim=1) for i in range(0, images.shape[0], bs)]
        return torch.cat(preds)

    def forward_passes_per_image(self, image_size=None, patch_size=None) -> int:
        return 1


class ClippedBagNet(_OnePassAggregation):
    """Clipped BagNet: a thin wrapper over ``bagcert.certify(model, ..., aggregation="clipped")``.

    ``margin``: the smallest worst-case difference of clipped class scores (float, > 0 iff certified);
    ``worst_position``: the patch position attaining it. The model must be a bagcert model
    (``local_logits`` + ``geometry``).
    """

    name = "clipped_bagnet"
    aggregation = "clipped"


class BagCert(_OnePassAggregation):
    """BagCert votes (the package's default certificate), for side-by-side comparisons.

    ``margin``: the smallest worst-case vote difference (integer, > 0 iff certified).
    """

    name = "bagcert"
    aggregation = "votes"
