"""bagcert: certified and empirical robustness of image classifiers against adversarial patches."""

from .aggregation import AGGREGATIONS, get_aggregation
from .certification import CertResult, certify, certify_logits
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .empirical import SoundnessError, evaluate_empirical
from .geometry import Geometry, parse_patch_size
from .geometry_inference import GeometryError, GeometryWarning, infer_geometry, verify_geometry
from .models import BagModel, InputError, create_model, list_models, load_model_module, register_model
from .peers import ClippedBagNet, DerandomizedSmoothing, LocalDoubleMasking, PatchCleanser, PatchGuardMasking
from .wrap import WrappedBagModel, wrap_model

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "BagModel",
    "CertResult",
    "CheckpointError",
    "ClippedBagNet",
    "DerandomizedSmoothing",
    "Geometry",
    "GeometryError",
    "GeometryWarning",
    "InputError",
    "LocalDoubleMasking",
    "PatchCleanser",
    "PatchGuardMasking",
    "SoundnessError",
    "certify",
    "certify_logits",
    "create_model",
    "evaluate_empirical",
    "get_aggregation",
    "infer_geometry",
    "list_models",
    "load_checkpoint",
    "load_model_module",
    "parse_patch_size",
    "register_model",
    "save_checkpoint",
    "verify_geometry",
    "wrap_model",
    "WrappedBagModel",
]

# defensive patches + corruptions (bagcert.defense), RoI / RoA analysis (bagcert.analysis)
from . import analysis, defense  # noqa: E402

__all__ += ["analysis", "defense"]

# end-to-end runs as a config + one function (bagcert.runs): the certification run of `bagcert certify`
from .runs import CertifyConfig, certify_run, run_certification  # noqa: E402

__all__ += ["CertifyConfig", "certify_run", "run_certification"]

# end-to-end report runs as a typed config + one function (bagcert.runs; the CLI tools call these)
from .runs import DefensivePatchConfig, ImageNetAConfig, RoiConfig, defensive_patch_run, imagenet_a_run, roi_run  # noqa: E402

__all__ += ["DefensivePatchConfig", "ImageNetAConfig", "RoiConfig", "defensive_patch_run", "imagenet_a_run", "roi_run"]

# training: the config and a whole run from it (bagcert.training, bagcert.runs)
from .runs.train import train_run  # noqa: E402
from .training import TrainConfig  # noqa: E402

__all__ += ["TrainConfig", "train_run"]
