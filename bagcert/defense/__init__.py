"""Data-end defenses and their evaluation.

* :mod:`bagcert.defense.defensive_patch`: class-specific defensive patches (Wang et al., CVPR 2022).
* :mod:`bagcert.defense.corruptions`: common corruptions at 5 severities, and L-inf PGD.
* :mod:`bagcert.defense.evaluate`: accuracy with / without a defensive patch under corruptions,
  L-inf PGD and adversarial patches, on the source model and transferred to others.
"""

from .common import eval_mode, logits_fn_of, predict_fn_of
from .corruptions import CORRUPTIONS, SEVERITY_PARAMS, corrupt, linf_pgd
from .defensive_patch import (
    DefensivePatch,
    correlation_distance,
    correlation_matrix,
    frame_mask,
    make_defensive_patches,
    optimize_global_correlation,
    optimize_local_prior,
    patch_mask,
    random_transform,
    square_mask,
)
from .evaluate import evaluate_defensive_patch, evaluate_transfer, random_patch_attack

__all__ = [
    "CORRUPTIONS",
    "SEVERITY_PARAMS",
    "DefensivePatch",
    "correlation_distance",
    "correlation_matrix",
    "corrupt",
    "eval_mode",
    "evaluate_defensive_patch",
    "evaluate_transfer",
    "frame_mask",
    "linf_pgd",
    "logits_fn_of",
    "make_defensive_patches",
    "optimize_global_correlation",
    "optimize_local_prior",
    "patch_mask",
    "predict_fn_of",
    "random_patch_attack",
    "random_transform",
    "square_mask",
]
