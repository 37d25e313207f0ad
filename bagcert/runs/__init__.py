"""Every end-to-end run as a typed config + one function (the command-line tools in bagcert/cli only map argv to
the config, call the function and print): nothing here parses argv or exits.

- :mod:`bagcert.runs.certify`: :class:`CertifyConfig`, :func:`certify_run` (``bagcert certify``; also
  :func:`run_certification` by keyword)
- :mod:`bagcert.runs.defensive_patch`: :class:`DefensivePatchConfig`, :func:`defensive_patch_run`
- :mod:`bagcert.runs.imagenet_a`: :class:`ImageNetAConfig`, :func:`imagenet_a_run`
- :mod:`bagcert.runs.roi`: :class:`RoiConfig`, :func:`roi_run`
- :mod:`bagcert.runs.train`: :func:`train_run` (a :class:`~bagcert.training.TrainConfig`: ``bagcert train``)

The report runs return an :class:`AnalysisReport` (results.json document, summary.md, one-line summary, folder)
and raise :class:`RunInputError` (a ``ValueError``) with one line for a mistake in the input (:class:`FieldError` for a
config field, :class:`~bagcert.report.ReportFolderError` for the report folder); the certification run raises
:class:`CertifyError` (a ``ValueError``); anything else is a bug.
"""

from ._checks import FieldError, RunInputError
from ._io import AnalysisReport
from .certify import CertifyConfig, CertifyError, CertifyResult, certify_run, run_certification
from .defensive_patch import DefensivePatchConfig, defensive_patch_run
from .imagenet_a import ImageNetAConfig, imagenet_a_run
from .roi import RoiConfig, roi_run
from .train import train_run

__all__ = ["AnalysisReport", "CertifyConfig", "CertifyError", "CertifyResult", "DefensivePatchConfig", "FieldError",
           "ImageNetAConfig", "RoiConfig", "RunInputError", "certify_run", "defensive_patch_run", "imagenet_a_run",
           "roi_run", "run_certification", "train_run"]
