"""Classification metrics for robustness evaluations: accuracy, RMS calibration error and AURRA.

All functions are pure: they accept torch tensors (any device), numpy arrays or Python lists,
never modify their inputs, and return plain Python floats. Computation is done in float64 numpy.

The definitions follow the ImageNet-A evaluation protocol (Hendrycks et al., "Natural Adversarial
Examples", CVPR 2021), re-implemented here from its description:

* :func:`accuracy` -- top-1 accuracy, the fraction of predictions equal to the labels.
* :func:`calibration_error` -- RMS calibration error with *adaptive* bins: samples are sorted by
  confidence and cut into bins of ``bin_size`` consecutive samples (100 in the protocol).
* :func:`aurra` -- area under the response-rate accuracy curve: the mean, over response rates
  k/N (k = 1..N), of the accuracy of the k most confident predictions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "calibration_error", "aurra"]


def _to_numpy(x, name: str) -> np.ndarray:
    """A 1-D numpy view of ``x`` (torch tensor, numpy array or list); ValueError otherwise."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16 or x.is_complex():
                x = x.to(torch.float64)
            x = x.numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        pass
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of numbers (tensor, array or list): {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}")


def _confidence(x, need_unit_interval: bool) -> np.ndarray:
    conf = _to_numpy(x, "confidence").astype(np.float64)
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidence holds NaN or infinite values; all confidences must be finite")
    if need_unit_interval and (conf.min() < 0.0 or conf.max() > 1.0):
        raise ValueError(
            f"confidence must lie in [0, 1] (probabilities), got values in [{conf.min():g}, {conf.max():g}]"
        )
    return conf


def _correct(x) -> np.ndarray:
    corr = _to_numpy(x, "correct").astype(np.float64)
    if not np.all((corr == 0.0) | (corr == 1.0)):
        bad = corr[~((corr == 0.0) | (corr == 1.0))][0]
        raise ValueError(f"correct must hold only 0/1 (or False/True) values, found {bad!r}")
    return corr


def accuracy(predictions, labels) -> float:
    """Top-1 accuracy: the fraction of positions where ``predictions == labels``.

    Args:
        predictions: predicted class indices, 1-D (tensor, array or list).
        labels: true class indices, 1-D, same length.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: inputs that are not 1-D, are empty, or differ in length.
    """
    pred = _to_numpy(predictions, "predictions")
    lab = _to_numpy(labels, "labels")
    _same_length(pred, lab, "predictions", "labels")
    return float(np.mean(pred == lab))


def calibration_error(confidence, correct, bin_size: int = 100, skip_last_bin: bool = False) -> float:
    """RMS calibration error with adaptive bins of ``bin_size`` samples.

    Samples are sorted by confidence, ascending (a stable sort: ties keep the order given). The
    sorted samples are cut into ``max(1, n // bin_size)`` bins of ``bin_size`` consecutive
    samples, the *last* bin taking the remainder: with n = 250 and bin_size = 100 the bins are
    [0, 100) and [100, 250); with n = 5 and bin_size = 2 they are [0, 2) and [2, 5). If there
    are fewer than ``bin_size`` samples there is a single bin, the whole set. Then::

        error = sqrt( sum over bins b of (|b| / n) * (mean confidence in b - mean correct in b) ** 2 )

    ``skip_last_bin=False`` (default) sums over all bins, as the formula says.

    ``skip_last_bin=True`` reproduces the reference ImageNet-A evaluation loop, which leaves the
    last bin out: its term is simply dropped while the weights of the other bins stay |b| / n of
    the *full* n (nothing is renormalised). With a single bin (n < 2 * bin_size) nothing is left
    and the result is 0.0.

    Args:
        confidence: confidence of each prediction (e.g. the max softmax probability), in [0, 1].
        correct: 1 (or True) where the prediction is right, 0 (or False) where it is wrong.
        bin_size: samples per bin, an integer >= 1 (100 in the ImageNet-A protocol).
        skip_last_bin: drop the last bin's term, as the reference implementation does.

    Returns:
        The RMS calibration error, a float in [0, 1].

    Raises:
        ValueError: empty inputs, different lengths, non-finite or out-of-range confidences,
            ``correct`` values other than 0/1, or ``bin_size`` not an integer >= 1.
    """
    if isinstance(bin_size, bool) or not isinstance(bin_size, (int, np.integer)) or bin_size < 1:
        raise ValueError(f"bin_size must be an integer >= 1, got {bin_size!r}")
    bin_size = int(bin_size)
    conf = _confidence(confidence, need_unit_interval=True)
    corr = _correct(correct)
    _same_length(conf, corr, "confidence", "correct")
    n = conf.shape[0]
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n_bins = max(1, n // bin_size)
    starts = [k * bin_size for k in range(n_bins)]
    ends = starts[1:] + [n]
    if skip_last_bin:
        starts, ends = starts[:-1], ends[:-1]
    total = 0.0
    for s, e in zip(starts, ends):
        gap = conf[s:e].mean() - corr[s:e].mean()
        total += (e - s) / n * gap * gap
    return float(np.sqrt(total))


def aurra(confidence, correct) -> float:
    """Area under the response-rate accuracy curve (AURRA).

    Predictions are sorted by confidence, descending (a stable sort: ties keep the order given).
    For each response rate k / N, k = 1..N, take the accuracy of the k most confident
    predictions; AURRA is the mean of these N accuracies. A classifier whose confidences rank
    every correct prediction above every wrong one scores highest for its accuracy; one that
    ranks them the other way round scores lowest.

    Only the order of the confidences matters, so they need not be probabilities: any finite
    scores are accepted.

    Args:
        confidence: confidence (or any score) of each prediction, finite.
        correct: 1 (or True) where the prediction is right, 0 (or False) where it is wrong.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty inputs, different lengths, non-finite confidences or ``correct``
            values other than 0/1.
    """
    conf = _confidence(confidence, need_unit_interval=False)
    corr = _correct(correct)
    _same_length(conf, corr, "confidence", "correct")
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(corr[order])
    k = np.arange(1, conf.shape[0] + 1, dtype=np.float64)
    return float(np.mean(hits / k))
