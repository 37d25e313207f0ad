"""bagcert: certified and empirical robustness of image classifiers against adversarial patches."""

from .aggregation import AGGREGATIONS, get_aggregation
from .certification import CertResult, certify, certify_logits
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .geometry import Geometry, parse_patch_size
from .models import BagModel, InputError, create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "BagModel",
    "CertResult",
    "CheckpointError",
    "Geometry",
    "InputError",
    "certify",
    "certify_logits",
    "create_model",
    "get_aggregation",
    "list_models",
    "load_checkpoint",
    "parse_patch_size",
    "register_model",
    "save_checkpoint",
]
