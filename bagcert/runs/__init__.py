"""End-to-end runs, each a typed config and one function (the ``bagcert`` commands are thin wrappers around them):

* :func:`certify_run` (:class:`CertifyConfig`): ``bagcert certify``, certify a checkpoint and write its report.
"""

from .certify import CertifyConfig, CertifyError, CertifyResult, certify_run, run_certification

__all__ = ["CertifyConfig", "CertifyError", "CertifyResult", "certify_run", "run_certification"]
