"""Empirical robustness next to the certificate, with the soundness check between them.

:func:`evaluate_empirical` runs a list of attacks on the same images for one patch size and compares them with
the certificate. The invariant that must hold for every attack inside the threat model:

    a sample that is certified (and correctly classified) is never broken by an attack,

hence the empirical robust accuracy is never below the certified accuracy. A violation means the certificate,
the geometry or an attack's threat-model enforcement is wrong -- the most serious bug this toolkit can have --
and raises :class:`SoundnessError` (after everything was measured, so the message can say what broke).

The feature-space worst case (:class:`~bagcert.attacks.feature_space.FeatureSpaceWorstCase`) is not an
image-space attack: its robust flags equal the certificate's exactly (a check of the certificate's
tightness); they enter the soundness check but not the "overall" empirical robust accuracy.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from .attacks.base import AttackResult, PatchAttack, restore_model_state
from .attacks.feature_space import FeatureSpaceResult, FeatureSpaceWorstCase
from .attacks.pgd import PatchPGD
from .attacks.universal import UniversalPatch
from .certification import CertResult, _fraction, certify
from .geometry import parse_patch_size

__all__ = [
    "ATTACK_NAMES",
    "AttackUnavailableError",
    "check_attacks",
    "EmpiricalResult",
    "SoundnessError",
    "build_attack",
    "evaluate_empirical",
    "run_empirical_evaluation",
    "soundness_message",
    "subset_cert_result",
]

#: names accepted by :func:`build_attack` (and ``certify.py --attacks``).
ATTACK_NAMES = ("pgd", "pgd-adaptive", "universal", "imagenet-patch", "feature-space")


class SoundnessError(AssertionError):
    """A sample the certificate declares robust was broken by an attack inside the threat model."""


class AttackUnavailableError(ValueError):
    """A requested attack cannot run on this model, data or attack file; the message says why."""


def _imagenet_patch_plan(model, data, metadata, imagenet_patch_path):
    """``(patch_set, label_mapping, note)`` for the ImageNet-Patch attack, or :class:`AttackUnavailableError`."""
    from .attacks.imagenet_patch import PatchFileError, load_imagenet_patch
    from .attacks.imagenet_patch_attack import imagenet_label_mapping

    # the checkpoint's own class list decides (a synthetic data set has placeholder class names)
    classes = None if (metadata or {}).get("classes") else getattr(data, "classes", None)
    ok, mapping, reason = imagenet_label_mapping(metadata, classes, model.num_classes)
    if not ok:
        raise AttackUnavailableError(f"imagenet-patch cannot run: {reason}")
    try:
        patch_set = load_imagenet_patch(imagenet_patch_path)
    except PatchFileError as e:
        raise AttackUnavailableError(f"imagenet-patch cannot run: patch file unavailable: {e}") from None
    note = (f"imagenet-patch: {reason}; a transfer attack with 50/224 of the image side before scaling, "
            "larger than most certified patches (see in_threat_model)")
    return patch_set, mapping, note


def check_attacks(attacks, model, data, metadata: dict | None = None, imagenet_patch_path=None) -> None:
    """Check, before any image is certified or attacked, that every attack in ``attacks`` can run on ``model``
    and ``data``: unknown names are a ``ValueError``, an attack that cannot run (ImageNet-Patch on a model
    whose labels are not ImageNet classes, or with a missing, truncated or refused patch file) an
    :class:`AttackUnavailableError` saying why."""
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; expected names from {', '.join(ATTACK_NAMES)}")
    if "imagenet-patch" in attacks:
        _imagenet_patch_plan(model, data, metadata, imagenet_patch_path)


@dataclass
class EmpiricalResult:
    """Outcome of :func:`evaluate_empirical` for one patch size (N images).

    Attributes:
        patch_size: (height, width).
        robust: ``{attack: bool [N]}``: still correctly classified after the attack.
        robust_accuracy: ``{attack: float}``.
        in_threat_model: ``{attack: bool}``: every mask of the attack fit in ``patch_size``.
        overall_robust: bool [N]: robust against every image-space attack inside the threat model.
        overall_robust_accuracy: float (None when no such attack ran).
        overall_attacks: the attacks that enter ``overall_robust``.
        certified: bool [N]: certified and correct (from the certificate given or computed).
        certified_accuracy, clean_accuracy: floats on these N images.
        certified_broken: number of certified-and-correct samples some attack broke (must be 0).
        broken_by: ``{attack: [indices]}`` of those samples.
        feature_space_mismatch: samples where feature-space ``broken`` differs from ``not certified``
            (must be 0; None when the feature-space attack did not run).
        prediction_mismatch: samples whose clean prediction in an attack differs from the certificate's.
        results: ``{attack: AttackResult | FeatureSpaceResult}``.
        timing: ``{attack: seconds}``.
    """

    patch_size: tuple
    robust: dict
    robust_accuracy: dict
    in_threat_model: dict
    overall_robust: torch.Tensor | None
    overall_robust_accuracy: float | None
    overall_attacks: list
    certified: torch.Tensor
    certified_accuracy: float
    clean_accuracy: float
    certified_broken: int
    broken_by: dict
    feature_space_mismatch: int | None
    prediction_mismatch: int
    results: dict = field(repr=False)
    timing: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.certified.numel())

    def summary(self) -> dict:
        """JSON-serialisable summary (no per-sample tensors)."""
        info = {}
        for name, res in self.results.items():
            if isinstance(res, AttackResult):
                info[name] = _jsonable(res.info)
            else:
                info[name] = {"flipped_count": int(res.flipped.sum()), "broken_count": int(res.broken.sum())}
        return {
            "patch_size": list(self.patch_size),
            "num_images": self.num_samples,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy,
            "robust_accuracy": dict(self.robust_accuracy),
            # the counts behind the fractions (each fraction is its count / num_images in double precision)
            "certified_count": int(self.certified.sum()),
            "robust_count": {n: int(v.sum()) for n, v in self.robust.items()},
            "correct_count": _count(self.clean_accuracy, self.num_samples),
            "overall_robust_count": None if self.overall_robust is None else int(self.overall_robust.sum()),
            "overall_robust_accuracy": self.overall_robust_accuracy,
            "overall_attacks": list(self.overall_attacks),
            "in_threat_model": dict(self.in_threat_model),
            "certified_broken": self.certified_broken,
            "broken_by": {k: list(v) for k, v in self.broken_by.items()},
            "feature_space_mismatch": self.feature_space_mismatch,
            "prediction_mismatch": self.prediction_mismatch,
            "time_s": dict(self.timing),
            "attack_info": info,
        }


def _count(fraction: float, n: int) -> int:
    """The integer count behind ``fraction`` = count / n (exact: fractions are counts divided in double precision)."""
    return int(round(fraction * n)) if n and fraction == fraction else 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def subset_cert_result(cert: CertResult, index) -> CertResult:
    """The rows ``index`` of a :class:`~bagcert.certification.CertResult`."""
    idx = torch.as_tensor(index, dtype=torch.long)
    pick = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
    return CertResult(
        prediction=pick(cert.prediction), label=pick(cert.label), correct=pick(cert.correct), certified=pick(cert.certified),
        margin=pick(cert.margin), worst_position=pick(cert.worst_position), patch_size=cert.patch_size,
        aggregation=cert.aggregation, position_margins=pick(cert.position_margins),
    )


def build_attack(name: str, patch_size, *, steps: int = 150, step_size: float = 0.05, locations: int = 80,
                 surrogate: str = "relaxed_votes", seed: int = 0, **kwargs):
    """An attack by its report name (:data:`ATTACK_NAMES`); ``kwargs`` go to the attack's constructor."""
    if name == "pgd":
        return PatchPGD(patch_size, steps, step_size, locations, placement="random", surrogate=surrogate, seed=seed, **kwargs)
    if name == "pgd-adaptive":
        return PatchPGD(patch_size, steps, step_size, locations, placement="adaptive", surrogate=surrogate, seed=seed, **kwargs)
    if name == "universal":
        return UniversalPatch(patch_size, steps, step_size, eval_poses=locations, surrogate=surrogate, seed=seed, **kwargs)
    if name == "feature-space":
        return FeatureSpaceWorstCase(**kwargs)
    if name == "imagenet-patch":
        from .attacks.imagenet_patch_attack import ImageNetPatchAttack

        return ImageNetPatchAttack(patch_size=patch_size, seed=seed, **kwargs)
    raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACK_NAMES)}")


def evaluate_empirical(
    model,
    images: torch.Tensor,
    labels,
    patch_size,
    attacks,
    cert_result: CertResult | None = None,
    *,
    raise_on_violation: bool = True,
) -> EmpiricalResult:
    """Run ``attacks`` on ``images`` for one ``patch_size`` and check them against the certificate.

    Args:
        model: a bagcert model.
        images: float [N, 3, H, W] in [0, 1]; labels: long [N].
        patch_size: int or (height, width): the threat model of the certificate and of the attacks.
        attacks: attack objects (:class:`~bagcert.attacks.base.PatchAttack`,
            :class:`~bagcert.attacks.feature_space.FeatureSpaceWorstCase`), names from :data:`ATTACK_NAMES`
            (built with default settings), or a ``{name: attack}`` dict. An unfitted
            :class:`~bagcert.attacks.universal.UniversalPatch` is fitted on ``images`` themselves (transductive;
            recorded in its info).
        cert_result: the certificate of these images for this patch size (computed when None).
        raise_on_violation: raise :class:`SoundnessError` when a certified sample was broken (else only record
            it in ``certified_broken``: the caller must then fail loudly itself).
    """
    ph, pw = parse_patch_size(patch_size)
    labels = torch.as_tensor(labels).to(images.device).long()
    N = images.shape[0]
    if cert_result is None:
        with restore_model_state(model):
            cert_result = certify(model, images, labels, (ph, pw))
    if cert_result.num_samples != N:
        raise ValueError(f"cert_result has {cert_result.num_samples} samples for {N} images")
    if tuple(cert_result.patch_size) != (ph, pw):
        raise ValueError(f"cert_result is for a {cert_result.patch_size} patch, not {(ph, pw)}")
    if not torch.equal(cert_result.label.cpu(), labels.cpu()):
        raise ValueError("cert_result's labels differ from the labels given: it belongs to other images")
    cert_ok = (cert_result.certified & cert_result.correct).cpu()

    if isinstance(attacks, dict):
        items = list(attacks.items())
    else:
        items = []
        for a in attacks:
            obj = build_attack(a, (ph, pw)) if isinstance(a, str) else a
            items.append((obj.name, obj))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate attack names {names}; pass a {{name: attack}} dict to name them apart")

    robust, in_tm, results, timing, broken_by = {}, {}, {}, {}, {}
    fs_mismatch = None
    pred_mismatch = torch.zeros(N, dtype=torch.bool)
    for name, attack in items:
        t0 = time.perf_counter()
        if isinstance(attack, FeatureSpaceWorstCase):
            with restore_model_state(model):
                res: FeatureSpaceResult | AttackResult = attack(model, images, labels, (ph, pw))
            r = res.robust.cpu()
            in_tm[name] = True
            viol = cert_ok & res.broken.cpu()
            # tightness: broken in feature space exactly when not certified
            fs_mismatch = int((res.broken.cpu() != ~cert_result.certified.cpu()).sum())
            pred_mismatch |= res.prediction.cpu() != cert_result.prediction.cpu()
        elif isinstance(attack, PatchAttack):
            if isinstance(attack, UniversalPatch) and attack.patch is None:
                attack.fit(model, images, labels, patch_size=(ph, pw))
                attack.fit_info["transductive"] = True
            res = attack(model, images, labels, (ph, pw))
            r = res.robust.cpu()
            tm = res.in_threat_model.cpu()
            in_tm[name] = bool(tm.all())
            viol = cert_ok & ~r & tm  # only images whose patch the certificate covers
            pred_mismatch |= res.clean_predictions.cpu() != cert_result.prediction.cpu()
        else:
            raise TypeError(f"attack {name!r} is a {type(attack).__name__}, not a PatchAttack or FeatureSpaceWorstCase")
        timing[name] = time.perf_counter() - t0
        robust[name], results[name] = r, res
        if viol.any():
            broken_by[name] = viol.nonzero().flatten().tolist()

    overall_names = [n for n, a in items if isinstance(a, PatchAttack) and in_tm[n]]
    overall = None
    if overall_names:
        overall = torch.stack([robust[n] for n in overall_names]).all(dim=0)
    broken_any = torch.zeros(N, dtype=torch.bool)
    for idx in broken_by.values():
        broken_any[idx] = True
    cert_acc = _fraction(cert_ok)
    out = EmpiricalResult(
        patch_size=(ph, pw),
        robust=robust,
        robust_accuracy={n: _fraction(v) for n, v in robust.items()},
        in_threat_model=in_tm,
        overall_robust=overall,
        overall_robust_accuracy=_fraction(overall) if overall is not None else None,
        overall_attacks=overall_names,
        certified=cert_ok,
        certified_accuracy=cert_acc,
        clean_accuracy=_fraction(cert_result.correct.cpu()),
        certified_broken=int(broken_any.sum()),
        broken_by=broken_by,
        feature_space_mismatch=fs_mismatch,
        prediction_mismatch=int(pred_mismatch.sum()),
        results=results,
        timing=timing,
    )
    # The invariant, stated on the accuracies too: never below the certified accuracy (inside the threat model).
    below = {n: out.robust_accuracy[n] for n in robust if in_tm[n] and out.robust_accuracy[n] < cert_acc}
    if fs_mismatch:
        warnings.warn(
            f"feature-space worst case disagrees with the certificate on {fs_mismatch} sample(s) for a {ph}x{pw} patch: "
            "the certificate should be exactly tight in feature space",
            RuntimeWarning,
            stacklevel=2,
        )
    if (out.certified_broken or below) and raise_on_violation:
        raise SoundnessError(soundness_message(out, below))
    return out


def soundness_message(res: EmpiricalResult, below: dict | None = None) -> str:
    ph, pw = res.patch_size
    lines = [
        "=" * 78,
        f"SOUNDNESS VIOLATION: {res.certified_broken} sample(s) CERTIFIED robust against {ph}x{pw} patches were BROKEN",
        "by an attack inside the threat model. The certificate, the receptive-field geometry or an attack's",
        "threat-model enforcement is wrong: no certified number from this code can be trusted until it is fixed.",
    ]
    for name, idx in res.broken_by.items():
        lines.append(f"  {name}: samples {idx[:20]}{' ...' if len(idx) > 20 else ''}")
    for name, acc in (below or {}).items():
        lines.append(f"  {name}: empirical robust accuracy {acc:.4f} < certified accuracy {res.certified_accuracy:.4f}")
    if res.prediction_mismatch:
        lines.append(f"  note: {res.prediction_mismatch} clean prediction(s) differ between the certificate's and the attack's "
                     "forward pass (numerical nondeterminism near a vote threshold?)")
    lines.append("=" * 78)
    return "\n".join(lines)


def _model_name(model) -> str | None:
    """The registry name of a model for figure titles, with " (dense)" for a dense evaluation; None if unknown."""
    from .report import model_label

    config = getattr(model, "config", None)
    return model_label(config.get("name"), config.get("kwargs")) if isinstance(config, dict) else None


def _method_title(model, aggregation: str, attack_info: dict, size) -> str:
    """The attacks and the certified model of an attack figure, e.g. ``"pgd (10 steps, 5 locations), 5x5 patch;
    BagCert (votes aggregation), cifar_bagnet5_s2"``."""
    from .report import certificate_method

    parts = []
    for name, info in attack_info.items():
        bits = [f"{info[k]} {k}" for k in ("steps", "locations") if isinstance(info.get(k), int) and not isinstance(info.get(k), bool)]
        parts.append(f"{name} ({', '.join(bits)})" if bits else name)
    model_name = _model_name(model)
    what = f"{', '.join(parts)}, {size[0]}x{size[1]} patch; " if parts else f"{size[0]}x{size[1]} patch; "
    return what + certificate_method(aggregation, model_name)


def _write_figures(model, x, y, cert, res, key, figure_images, metadata, data, out_dir, notes) -> list:
    """Write ``attack_examples_<key>.png`` and ``uncertified_positions_<key>.png`` for up to ``figure_images``
    attacked images chosen by :func:`bagcert.report.select_example_rows` (correct on clean input, images an
    attack broke first) and return the file names written. Classes are named from the checkpoint metadata's
    ``classes`` (else the data set's). When no attacked image is correct on clean input the first ones are
    shown, and the figure's title and a note say that they were wrong already."""
    from .report import certificate_method, plot_attack_examples, plot_uncertified_positions, select_example_rows

    size = cert.patch_size
    attacked = {a: r for a, r in res.results.items() if isinstance(r, AttackResult)}
    preds = torch.stack([r.predictions.cpu() for r in attacked.values()]) if attacked else cert.prediction.cpu().unsqueeze(0)
    rows = select_example_rows(cert.correct, preds, cert.label, cert.certified, figure_images)
    caveat = "\nrows: images correct on clean input, those an attack broke first"
    if rows.numel() == 0:
        rows = torch.arange(min(int(figure_images), cert.num_samples))
        caveat = "; none of the attacked images is correct on clean input: the rows shown were wrong already"
        notes.append(f"patch {key}: figures show images misclassified on clean input (none of the attacked images is correct)")
    classes = (metadata or {}).get("classes") or getattr(data, "classes", None)
    xs, ys = x[rows.to(x.device)], y[rows.to(y.device)]
    model_name = _model_name(model)
    figures = []
    if attacked:
        adv = {a: (r.adv_images[rows.to(r.adv_images.device)], r.predictions[rows.to(r.predictions.device)],
                   r.masks[rows.to(r.masks.device)]) for a, r in attacked.items()}
        title = _method_title(model, cert.aggregation, {a: r.info for a, r in attacked.items()}, size) + caveat
        if plot_attack_examples(out_dir / f"attack_examples_{key}.png", xs, ys, cert.prediction.cpu()[rows], adv, classes,
                                title=title, certified=cert.certified.cpu()[rows], patch_size=size):
            figures.append(f"attack_examples_{key}.png")
    with restore_model_state(model):
        maps = certify(model, xs, ys, size, return_position_margins=True)
    if plot_uncertified_positions(out_dir / f"uncertified_positions_{key}.png", xs, maps.position_margins, ys, maps.prediction,
                                  maps.certified, size, classes, aggregation=maps.aggregation,
                                  method=certificate_method(maps.aggregation, model_name)):
        figures.append(f"uncertified_positions_{key}.png")
    return figures


def run_empirical_evaluation(
    model,
    data,
    cert_results: dict,
    attacks,
    *,
    patch_sizes=None,
    num_images: int | None = None,
    steps: int = 150,
    step_size: float = 0.05,
    locations: int = 80,
    surrogate: str = "relaxed_votes",
    seed: int = 0,
    universal_fit_images: int = 256,
    metadata: dict | None = None,
    imagenet_patch_path=None,
    device="cpu",
    output=None,
    figure_images: int = 4,
    log=None,
    allow_skip: bool = False,
    progress: bool = False,
) -> dict:
    """The empirical half of ``certify.py``: attack a seeded subset of ``data`` for each patch size and compare
    with the certificate already computed for the whole set.

    Args:
        model: the bagcert model (eval mode).
        data: a :class:`bagcert.data.Dataset` (the images that were certified, in the same order).
        cert_results: ``{size_key: CertResult}`` over all of ``data``.
        attacks: names from :data:`ATTACK_NAMES`.
        patch_sizes: size keys to attack (default: every key of ``cert_results``).
        num_images: attack the first ``num_images`` of a seeded permutation (default: all images).
        steps, step_size, locations, surrogate, seed: attack settings (``locations`` is also the number of
            random poses tried per image by the universal patch; ``steps`` its optimisation steps).
        universal_fit_images: images (not attacked ones, when any are left) the universal patch is trained on.
        metadata: checkpoint metadata (decides whether ImageNet-Patch applies).
        output: folder for figures (None: no figures).
        log: callable for progress lines (None: silent).
        allow_skip: an attack that cannot run (see :func:`check_attacks`) is recorded in
            ``summary["skipped"]`` with the reason and the others run; False (default): it raises
            :class:`AttackUnavailableError` before anything is attacked.
        progress: a tqdm bar on stderr counting the attacked images of each patch size.

    Returns ``{"summary": <JSON object "empirical" of the report>, "indices": [...], "robust": {size: {attack:
    bool tensor}}, "results": {size: EmpiricalResult}}``; never raises on a soundness violation (read
    ``summary["per_size"][size]["certified_broken"]``).
    """
    from pathlib import Path

    from .attacks.imagenet_patch_attack import ImageNetPatchAttack

    log = log or (lambda msg: None)
    attacks = list(dict.fromkeys(attacks))
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; expected names from {', '.join(ATTACK_NAMES)}")
    keys = list(cert_results) if patch_sizes is None else list(patch_sizes)
    missing = [k for k in keys if k not in cert_results]
    if missing:
        raise ValueError(f"attack patch sizes {missing} were not certified (certified: {list(cert_results)})")
    n = len(data)
    m = n if num_images is None else min(int(num_images), n)
    if m < 1:
        raise ValueError(f"need at least one image to attack, got {num_images}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = perm[:m].sort().values
    fit_idx = perm[m : m + universal_fit_images].sort().values
    x = data.float_images(idx).to(device)
    y = data.labels[idx].to(device)
    notes, skipped = [], {}

    imagenet_set, mapping = None, None
    if "imagenet-patch" in attacks:
        try:
            imagenet_set, mapping, note = _imagenet_patch_plan(model, data, metadata, imagenet_patch_path)
            notes.append(note)
        except AttackUnavailableError as e:
            if not allow_skip:
                raise
            skipped["imagenet-patch"] = str(e).removeprefix("imagenet-patch cannot run: ")
    if "universal" in attacks:
        if fit_idx.numel():
            notes.append(f"universal: patch trained on {fit_idx.numel()} images disjoint from the attacked ones")
        else:
            notes.append("universal: no images left outside the attacked subset; patch trained on the attacked images "
                         "themselves (transductive: stronger than a true universal patch)")
    x_fit = data.float_images(fit_idx).to(device) if fit_idx.numel() else x
    y_fit = data.labels[fit_idx].to(device) if fit_idx.numel() else y

    per_size, robust, raw, settings = {}, {}, {}, {}
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(keys) * m, unit="img", desc="attacks", disable=not progress, leave=False)
    for key in keys:
        cert = subset_cert_result(cert_results[key], idx)
        size = cert.patch_size
        bar.set_postfix_str(f"patch {key}")
        objs = {}
        for name in attacks:
            if name in skipped:
                continue
            if name == "imagenet-patch":
                objs[name] = ImageNetPatchAttack(imagenet_set, label_to_imagenet=mapping, patch_size=size, seed=seed)
            elif name == "universal":
                t0 = time.perf_counter()
                objs[name] = build_attack(name, size, steps=steps, step_size=step_size, locations=locations, surrogate=surrogate, seed=seed)
                objs[name].fit(model, x_fit, y_fit)
                objs[name].fit_info["fit_s"] = time.perf_counter() - t0
            else:
                objs[name] = build_attack(name, size, steps=steps, step_size=step_size, locations=locations, surrogate=surrogate, seed=seed)
            settings.setdefault(name, _jsonable(objs[name].settings()))
        log(f"attacking {m} images, patch {key}: {', '.join(objs)}")
        res = evaluate_empirical(model, x, y, size, objs, cert_result=cert, raise_on_violation=False)
        summ = res.summary()
        for name, r in res.results.items():  # e.g. ImageNet-Patch's 35-71 px patches against a 5x5 certificate
            if isinstance(r, AttackResult) and not res.in_threat_model[name]:
                from .report import threat_model_note

                note = threat_model_note(name, r.masks, size)
                if note:
                    notes.append(f"patch {key}: {note}")
        figures = []
        if out_dir is not None and figure_images > 0:
            figures = _write_figures(model, x, y, cert, res, key, figure_images, metadata, data, out_dir, notes)
        summ["figures"] = figures
        per_size[key] = summ
        robust[key] = dict(res.robust)
        raw[key] = res
        if res.certified_broken:
            log(soundness_message(res))
        bar.update(m)
    bar.close()
    summary = {
        "attacks": attacks,
        "num_images_attacked": int(m),
        "subset_seed": int(seed),
        "settings": settings,
        "skipped": skipped,
        "notes": notes,
        "per_size": per_size,
    }
    return {"summary": summary, "indices": idx.tolist(), "robust": robust, "results": raw}
