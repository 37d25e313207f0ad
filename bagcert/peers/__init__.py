"""Peer certified patch defenses behind one interface.

Every certifier has ``name``, ``certify(model_or_fn, images, labels, patch_size) -> CertResult``,
``predict(model_or_fn, images, patch_size=None)`` and ``forward_passes_per_image(image_size, patch_size)``:

* :class:`BagCert` (votes, the package default) and :class:`ClippedBagNet` (Zhang et al. 2020):
  one pass of a bagcert model.
* :class:`PatchGuardMasking` (Xiang et al. 2021, robust masking): one pass of a bagcert model.
* :class:`LocalDoubleMasking` (PatchCleanser's double masking on the local vote / logit map, PatchCURE's
  secure pooling): one pass of a bagcert model.
* :class:`DerandomizedSmoothing` (Levine & Feizi 2020): W (column) or H*W (block) passes of any
  base classifier on ablated, encoded images (:class:`AblatedInput`, :func:`ablation_classifier`).
* :class:`PatchCleanser` (Xiang et al. 2022, double masking): k^2 (k^2 + 1) / 2 passes of any
  classifier on masked images (:class:`MaskSet`).

Training their base classifiers: ``train.py --peer SPEC`` (:class:`PeerSpec`, :func:`load_peer_certifier`).
See docs/peers.md for the rules, the derivations and what the tests check.
"""

from .base import PeerCertifier
from .classifiers import PooledClassifier, ablation_classifier, init_peer_classifier, load_peer_classifier, save_peer_classifier
from .clipped import BagCert, ClippedBagNet
from .evaluation import certify_peer_dataset
from .patchcleanser import MaskSet, PatchCleanser, double_masking_from_pairs, mask_axis
from .local_masking import FeatureMaskSet, LocalDoubleMasking, double_masking_certify_evidence, double_masking_predict, feature_mask_set
from .patchguard import PatchGuardMasking, evidence_window_size, patchguard_certify_evidence, robust_masking
from .smoothing import AblatedInput, DerandomizedSmoothing, ablation_keep_masks, affected_ablations, certify_counts
from .spec import PEER_METHODS, PeerSpec, load_peer_certifier, parse_peer_spec
from .training_transforms import random_ablation, random_masks

__all__ = [
    "certify_peer_dataset",
    "AblatedInput",
    "BagCert",
    "ClippedBagNet",
    "DerandomizedSmoothing",
    "FeatureMaskSet",
    "LocalDoubleMasking",
    "MaskSet",
    "PEER_METHODS",
    "PatchCleanser",
    "PatchGuardMasking",
    "PeerSpec",
    "PeerCertifier",
    "PooledClassifier",
    "ablation_classifier",
    "ablation_keep_masks",
    "affected_ablations",
    "certify_counts",
    "double_masking_certify_evidence",
    "double_masking_from_pairs",
    "double_masking_predict",
    "evidence_window_size",
    "feature_mask_set",
    "init_peer_classifier",
    "load_peer_certifier",
    "load_peer_classifier",
    "mask_axis",
    "parse_peer_spec",
    "patchguard_certify_evidence",
    "random_ablation",
    "random_masks",
    "robust_masking",
    "save_peer_classifier",
]
