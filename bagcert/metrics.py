"""Classification metrics for robustness evaluations: accuracy, RMS calibration error, AURRA, and the paired
difference of two models' accuracies on the same images.

All functions are pure: they accept torch tensors (any device), numpy arrays or Python lists,
never modify their inputs, and return plain Python floats (or ``None`` where a value is undefined,
see :func:`calibration_error`). Computation is done in float64 numpy.

The definitions follow the ImageNet-A evaluation protocol (Hendrycks et al., "Natural Adversarial
Examples", CVPR 2021), re-implemented here from its description:

* :func:`accuracy` -- top-1 accuracy, the fraction of predictions equal to the labels.
* :func:`calibration_error` -- RMS calibration error with *adaptive* bins: samples are sorted by
  confidence and cut into bins of ``bin_size`` consecutive samples (100 in the protocol).
* :func:`aurra` -- area under the response-rate accuracy curve: the mean, over response rates
  k/N (k = 1..N), of the accuracy of the k most confident predictions
  (:func:`response_rate_curve`).
* :func:`paired_difference` -- two models (or two certifiers) scored on the same images: the difference of their
  accuracies with a paired 95 % interval and McNemar's exact test, far tighter than comparing two
  independent intervals, because only the images where they disagree carry information.

**Ties.** Every metric depends only on the multiset of (confidence, correct) pairs: permuting the
samples gives bit-identical results. Sorting by confidence does not order samples of equal
confidence (a *tie group*), and the protocol's definitions, read literally, let the input order
decide which of them come first. Here a tie group is handled as a whole: its samples are
exchangeable, so each of them is credited the group's accuracy (hits / size of the group), which is
the expected correctness of any position inside the group when the group's order is uniformly
random. For AURRA this makes the value exactly the expectation over random tie-breaking (the
metric is linear in the per-position correctness), the treatment of tied scores of McSherry &
Najork, "Computing Information Retrieval Performance Measures Efficiently in the Presence of Tied
Scores" (ECIR 2008), and the same as the diagonal ROC segments of tied scores in Fawcett, "An
introduction to ROC analysis" (Pattern Recognition Letters 27, 2006). Without ties nothing changes:
the values equal the protocol's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "calibration_error", "aurra", "response_rate_curve", "paired_difference"]


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


def _correct(x, name: str = "correct") -> np.ndarray:
    corr = _to_numpy(x, name).astype(np.float64)
    if not np.all((corr == 0.0) | (corr == 1.0)):
        bad = corr[~((corr == 0.0) | (corr == 1.0))][0]
        raise ValueError(f"{name} must hold only 0/1 (or False/True) values, found {float(bad):g}")
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


def _tie_groups(conf: np.ndarray, corr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tie groups of ``conf``: distinct values ascending, group sizes (int64) and hits (float64).

    Depends only on the multiset of pairs: ``np.unique`` sorts, and the hits are sums of 0/1 values,
    exact in float64 whatever the order. ``+ 0.0`` turns -0.0 into 0.0 so that the two, which compare
    equal, cannot leave the group's value to the input order.
    """
    values, inverse, counts = np.unique(conf + 0.0, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse.reshape(-1), weights=corr, minlength=values.shape[0])
    return values, counts.astype(np.int64), hits


def calibration_error(confidence, correct, bin_size: int = 100, skip_last_bin: bool = False) -> float | None:
    """RMS calibration error with adaptive bins of ``bin_size`` samples.

    Samples are sorted by confidence, ascending, and the sorted sequence is cut into
    ``max(1, n // bin_size)`` bins of ``bin_size`` consecutive positions, the *last* bin taking the
    remainder: with n = 250 and bin_size = 100 the bins are [0, 100) and [100, 250); with n = 5 and
    bin_size = 2 they are [0, 2) and [2, 5). If there are fewer than ``bin_size`` samples there is a
    single bin, the whole set. Then::

        error = sqrt( sum over bins b of (|b| / n) * (mean confidence in b - accuracy of b) ** 2 )

    **Ties.** The sorted confidences, hence every bin's mean confidence, do not depend on the input
    order; which of several samples of *equal* confidence land on either side of a bin boundary
    would. So every sample is credited the accuracy of its tie group (all samples of the same
    confidence): a bin that holds t of a group's m samples, h of them correct, counts t * h / m
    correct answers, the expected count when the group's order is uniformly random. Bins keep
    their sizes; a bin that splits no tie group has exactly the protocol's accuracy. (This is the
    expected accuracy of each bin, not the expected error: the latter would add the variance of
    an arbitrary split, which says nothing about calibration.) The result is identical, bit for
    bit, for every permutation of the (confidence, correct) pairs.

    ``skip_last_bin=False`` (default) sums over all bins, as the formula says.

    ``skip_last_bin=True`` reproduces the reference ImageNet-A evaluation loop, which leaves the
    last bin out: its term is simply dropped while the weights of the other bins stay |b| / n of
    the *full* n (nothing is renormalised). With a single bin (n < 2 * bin_size) nothing is left:
    the value is undefined and ``None`` is returned.

    Args:
        confidence: confidence of each prediction (e.g. the max softmax probability), in [0, 1], 1-D.
        correct: 1 (or True) where the prediction is right, 0 (or False) where it is wrong; same length.
        bin_size: samples per bin, an integer >= 1 (100 in the ImageNet-A protocol).
        skip_last_bin: drop the last bin's term, as the reference implementation does.

    Returns:
        The RMS calibration error, a float in [0, 1]; ``None`` when ``skip_last_bin`` leaves no bin.

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
    values, counts, hits = _tie_groups(conf, corr)
    conf = np.repeat(values, counts)  # sorted ascending
    credit = np.repeat(hits / counts, counts)  # each sample credited its tie group's accuracy
    n_bins = max(1, n // bin_size)
    starts = [k * bin_size for k in range(n_bins)]
    ends = starts[1:] + [n]
    if skip_last_bin:
        if n_bins == 1:
            return None
        starts, ends = starts[:-1], ends[:-1]
    total = 0.0
    for s, e in zip(starts, ends):
        gap = conf[s:e].mean() - credit[s:e].mean()
        total += (e - s) / n * gap * gap
    return float(np.sqrt(total))


def response_rate_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """The response-rate accuracy curve: accuracy of the k most confident predictions, k = 1..N.

    **Ties.** When the k-th and (k+1)-th most confident predictions have the same confidence, "the
    k most confident" is not determined by the scores. The curve gives the *expected* accuracy when
    the order inside each tie group is uniformly random: with s predictions of higher confidence, c
    of them correct, and a tie group of m predictions with h correct, the point k = s + j
    (1 <= j <= m) is (c + j * h / m) / k. At group boundaries (j = m) this is the exact accuracy of
    the threshold "answer when confidence >= this value"; in between, the number of correct answers
    is linearly interpolated, the accuracy of answering a random j of the tied predictions
    (McSherry & Najork, ECIR 2008). Identical, bit for bit, for every permutation of the pairs.

    Args:
        confidence: confidence (or any finite score) of each prediction, 1-D; only its order matters.
        correct: 1 (or True) where the prediction is right, 0 (or False) where it is wrong; same length.

    Returns:
        ``(rates, accuracy)``: float64 numpy arrays of shape [N]; ``rates[k-1] = k / N`` and
        ``accuracy[k-1]`` the (expected) accuracy of the k most confident predictions, in [0, 1].

    Raises:
        ValueError: empty inputs, different lengths, non-finite confidences or ``correct``
            values other than 0/1.
    """
    conf = _confidence(confidence, need_unit_interval=False)
    corr = _correct(correct)
    _same_length(conf, corr, "confidence", "correct")
    _, counts, hits = _tie_groups(conf, corr)
    counts, hits = counts[::-1], hits[::-1]  # most confident group first
    before = np.cumsum(counts) - counts  # predictions ranked above each group
    hits_before = np.cumsum(hits) - hits  # integers, exact in float64
    group = np.repeat(np.arange(counts.shape[0]), counts)
    n = conf.shape[0]
    k = np.arange(1, n + 1, dtype=np.int64)
    j = k - before[group]
    # (j * h) is an exact integer product: one rounding in the division, exact at group ends (j = m)
    expected_hits = hits_before[group] + (j * hits[group]) / counts[group]
    accuracy = expected_hits / k
    return k / n, accuracy


def aurra(confidence, correct) -> float:
    """Area under the response-rate accuracy curve (AURRA).

    The mean, over the response rates k / N (k = 1..N), of the accuracy of the k most confident
    predictions (:func:`response_rate_curve`). A classifier whose confidences rank every correct
    prediction above every wrong one scores highest for its accuracy; one that ranks them the other
    way round scores lowest.

    **Ties** are resolved by expectation: the value is the mean of AURRA over all orders of the
    predictions that sort the confidences (every order inside each tie group equally likely), so
    e.g. four predictions of equal confidence, two right, give 0.5 whatever their order. Without
    ties it is the protocol's value. Identical, bit for bit, for every permutation of the pairs.

    Only the order of the confidences matters, so they need not be probabilities: any finite
    scores are accepted.

    Args:
        confidence: confidence (or any score) of each prediction, finite, 1-D.
        correct: 1 (or True) where the prediction is right, 0 (or False) where it is wrong; same length.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty inputs, different lengths, non-finite confidences or ``correct``
            values other than 0/1.
    """
    _, accuracy = response_rate_curve(confidence, correct)
    return float(np.mean(accuracy))


def paired_difference(hits_a, hits_b) -> dict:
    """Compare two 0/1 outcome vectors over the same images (e.g. "certified and correct" of two models).

    With ``a_only`` the images only A gets right and ``b_only`` those only B gets right (the discordant pairs),
    the difference of accuracies is ``(b_only - a_only) / n``. Its 95 % interval is the Wald interval for the
    difference of paired proportions (Agresti, "Categorical Data Analysis", 3rd ed., section 11.1.1),
    ``d +- 1.96 * sqrt(a_only + b_only - n d^2) / n``; the p-value is McNemar's exact (binomial) test,
    two-sided, of ``b_only`` among the ``a_only + b_only`` discordant pairs at one half (McNemar, Psychometrika
    12, 1947; ``scipy.stats.binomtest``). The interval says how far the difference may be on *other images*
    from the same distribution; it does not include the variation between training runs (seeds).

    Args:
        hits_a, hits_b: 1-D, same length n > 0, values 0/1 or bool (tensor, array or list); position i is the
            same image in both.

    Returns:
        dict: ``n``, ``accuracy_a``, ``accuracy_b``, ``a_only``, ``b_only``, ``difference`` (B minus A, a fraction),
        ``ci95`` (low, high), ``p_value`` (1.0 when there is no discordant pair).

    Raises:
        ValueError: inputs that are not 1-D, are empty, differ in length or hold values other than 0/1.
    """
    from scipy.stats import binomtest

    a, b = _correct(hits_a, "hits_a"), _correct(hits_b, "hits_b")
    _same_length(a, b, "hits_a", "hits_b")
    n = a.shape[0]
    a_only, b_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    d = (b_only - a_only) / n
    half = 1.959963984540054 * np.sqrt(max(a_only + b_only - n * d * d, 0.0)) / n
    p = binomtest(b_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"n": n, "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()), "a_only": a_only, "b_only": b_only,
            "difference": float(d), "ci95": (float(d - half), float(d + half)), "p_value": float(p)}
