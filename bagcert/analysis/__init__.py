"""Analyses of where models look and where attacks act.

* :mod:`bagcert.analysis.roi`: Region of Importance / Region of Attack, neutralisation and their
  overlap (after Chattopadhyay et al., arXiv 2011.10794).
"""

from .roi import (
    binarize_top_q,
    box_filter,
    evaluate_neutralization,
    iou,
    iou_across_q,
    location_pixel_membership,
    neutralize,
    occlusion_roi,
    roa_from_gradient,
    roa_from_perturbation,
    roi_from_local_logits,
    upsample_local_map,
)

__all__ = [
    "binarize_top_q",
    "box_filter",
    "evaluate_neutralization",
    "iou",
    "iou_across_q",
    "location_pixel_membership",
    "neutralize",
    "occlusion_roi",
    "roa_from_gradient",
    "roa_from_perturbation",
    "roi_from_local_logits",
    "upsample_local_map",
]
