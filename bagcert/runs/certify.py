"""The certification run of ``bagcert certify`` as a library call: :class:`CertifyConfig` (one field per option) and
:func:`certify_run` (certify, optionally attack, write the report folder).

    from bagcert.runs import CertifyConfig, certify_run
    result = certify_run(CertifyConfig(patch_sizes="5", num_images=8, output="outputs/c10-sample"))
    result.summary["certified_accuracy"]        # {"5": ...}: the results.json document, as a dict

The run is the command's, step for step (its module docstring, ``bagcert certify --help``, documents every option):
the options are checked first (:class:`CertifyConfig` refuses a bad value when it is built), then the output folder,
the checkpoint and the data, all before any forward pass; the report is staged beside the output folder and moved
into place as one set. A mistake in the input is a :class:`CertifyError` (a ``ValueError``) with the one line
``bagcert certify`` prints; nothing here exits the process. Under torchrun every rank calls :func:`certify_run`
(images are sharded, rank 0 writes the report and gets the result, the other ranks get None).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .. import shipped
from . import _checks
from ._certify_parts import (DATA_PATHS, CertifyError, bad_image_errors, check_certifier_option, check_one_process,
                             check_peer_sizes, check_skip_bad_images, check_workers_apply, checkpoint_format,
                             checkpoint_input_size, double_masking_options, drop_skipped, image_hw, import_model_modules,
                             load_peer, one_line, open_data, parse_attacks, prepare_output, progress_kwarg, resolve_inputs,
                             resolve_size_tokens, shipped_certifier, size_tokens, skip_record, stream_provenance, user_errors)

__all__ = ["CertifyConfig", "CertifyError", "CertifyResult", "certify_run", "run_certification", "DEFAULT_MODEL",
           "DEFAULT_CHECKPOINT", "DEFAULT_DATASET", "DEFAULT_PATCH_SIZES", "DEFAULT_OUTPUT", "DATA_PATHS"]

#: the shipped default model's name (the default ``checkpoint``), its file and the bundled samples (the default
#: dataset): in a checkout's checkpoints/ and samples/, in an installed package under bagcert/_data
DEFAULT_MODEL = shipped.DEFAULT_MODEL
DEFAULT_CHECKPOINT = shipped.shipped_models()[DEFAULT_MODEL].path
DEFAULT_DATASET = shipped.samples_path("cifar10")
#: the patch sizes certified when ``patch_sizes`` is None (a bagcert model without a shipped certificate)
DEFAULT_PATCH_SIZES = "1,2,3,4,5,6,7,8,3x7,7x3"
#: the report folder when ``output`` is None; its previous report is replaced by each such run
DEFAULT_OUTPUT = "outputs/certify"

AGGREGATIONS = ("votes", "majority", "clipped")
PRECISIONS = ("fp32", "bf16")
CERTIFIERS = ("shipped", "votes")
DOUBLE_MASKING_EVIDENCE = ("votes", "logits")
ATTACK_SURROGATES = ("relaxed_votes", "logits")

_PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class CertifyConfig:
    """Every option of ``bagcert certify``, by its argument name (``--num-images`` is ``num_images``), with the
    command's defaults. Built from the command line by ``bagcert certify``, or directly.

    Fields (see ``bagcert certify --help`` for each option's full meaning):

    * ``checkpoint``: a shipped model's name, a bagcert checkpoint file or a peer classifier file (default: the shipped
      default model ``bagcert-cifar10-r5-dm``); ``model_modules``: .py files / dotted modules registering models of
      the user's own, imported first (default None).
    * ``dataset``: a dataset spec or folder (None: the 200 bundled CIFAR-10 test images); ``split`` (default "test").
    * ``patch_sizes``: "5,3x7,2%", one size ``5`` or a list of sizes (``5``, ``"3x7"``, ``(3, 7)``, ``"2%"``), kept as
      the comma-separated text (None: the default sizes, or a shipped model's card patch size for its own certificate).
    * the certificate: ``aggregation`` (None: the model's own; "votes", "majority", "clipped"), ``dense``,
      ``robust_masking``, ``double_masking`` with ``double_masking_evidence`` ("votes", "logits"; None: votes) and
      ``double_masking_clip`` ("LOW,HIGH" or a pair; None: -1,1 for logits), ``certifier`` (None, "shipped", "votes").
    * the images and the work: ``num_images`` (None: all; else an int >= 1), ``batch_size`` (250), ``precision``
      ("fp32", "bf16"), ``device`` ("cpu"; "cuda", "cuda:N", "mps" when present), ``data_path`` ("auto", "memory",
      "stream"), ``workers`` (0, at most what the machine can run), ``skip_bad_images`` (False), ``cache`` (True),
      ``seed`` (0), ``threads`` (None: torch's choice; else an int >= 1).
    * the report: ``output`` (None: ``outputs/certify``, whose previous report is replaced; a folder given is refused
      when it holds a report unless ``overwrite``), ``overwrite`` (False), ``progress`` (True: progress bars on
      stderr), ``quiet`` (False; True also silences the attack log).
    * peer classifiers: ``mask_patch_size`` (PatchCleanser only; None: the spec's), ``peer_batch_size`` (512).
    * attacks: ``attacks`` ("" or a comma-separated list / sequence of attack names), ``attack_steps`` (150),
      ``attack_step_size`` (0.05, in (0, 1]), ``attack_locations`` (80), ``attack_images`` (None: all),
      ``attack_patch_sizes`` (None: all of ``patch_sizes``), ``attack_surrogate`` ("relaxed_votes", "logits"),
      ``universal_fit_images`` (256), ``imagenet_patch_file`` (None: ``$BAGCERT_IMAGENET_PATCH`` or the shared copy).

    Building the config checks every value alone (type, range, choice: ``num_images: must be a positive integer, got
    0``) and every combination that needs nothing but the options (``--robust-masking cannot be combined with
    --attacks: ...``): :class:`CertifyError` (a ``ValueError``) with one line. Paths, sizes and lists are normalised
    (``Path`` -> str, ``[5, (3, 7)]`` -> ``"5,3x7"``, ``"cuda"`` -> the device's text). What needs files (the checkpoint,
    the dataset, the output folder) is checked by :func:`certify_run` before any work.
    """

    checkpoint: _PathLike = DEFAULT_MODEL
    model_modules: Optional[Sequence[str]] = None
    dataset: Optional[_PathLike] = None
    split: str = "test"
    patch_sizes: Optional[Union[str, Sequence]] = None
    aggregation: Optional[str] = None
    dense: bool = False
    robust_masking: bool = False
    double_masking: bool = False
    double_masking_evidence: Optional[str] = None
    double_masking_clip: Optional[Union[str, Sequence[float]]] = None
    certifier: Optional[str] = None
    num_images: Optional[int] = None
    batch_size: int = 250
    precision: str = "fp32"
    device: str = "cpu"
    data_path: str = "auto"
    workers: int = 0
    skip_bad_images: bool = False
    cache: bool = True
    seed: int = 0
    threads: Optional[int] = None
    output: Optional[_PathLike] = None
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False
    mask_patch_size: Optional[Union[str, int, Sequence[int]]] = None
    peer_batch_size: int = 512
    attacks: Union[str, Sequence[str]] = ""
    attack_steps: int = 150
    attack_step_size: float = 0.05
    attack_locations: int = 80
    attack_images: Optional[int] = None
    attack_patch_sizes: Optional[Union[str, Sequence]] = None
    attack_surrogate: str = "relaxed_votes"
    universal_fit_images: int = 256
    imagenet_patch_file: Optional[_PathLike] = None

    def __post_init__(self):
        _check_values(self)
        _check_combinations(self)

    def checked(self) -> "CertifyConfig":
        """``self``, checked again (the device and the worker limit depend on the machine, e.g. a config built on
        another one); :class:`CertifyError` with one line otherwise."""
        self.__post_init__()
        return self


class CertifyResult(NamedTuple):
    """What :func:`certify_run` returns on rank 0: ``summary`` is the ``results.json`` document (a dict: config,
    checkpoint, dataset, clean / certified accuracy with 95 % intervals, certified_broken, ...), ``empirical`` the
    attack results (:func:`bagcert.empirical.run_empirical_evaluation`; None without attacks), ``markdown`` the text
    of ``summary.md``."""

    summary: dict
    empirical: Optional[dict]
    markdown: str

    @property
    def broken(self) -> dict:
        """``{patch size: count}`` of certified samples an attack broke (empty when none: a sound run). Non-empty
        means a soundness bug; ``bagcert certify`` then exits with status 3."""
        return {k: v for k, v in (self.summary.get("certified_broken") or {}).items() if v}


# ------------------------------------------------------------------------------------------------
# checking the config
# ------------------------------------------------------------------------------------------------
def _set(cfg, name, value) -> None:
    object.__setattr__(cfg, name, value)


def _field_error(name, message) -> CertifyError:
    return CertifyError(one_line(f"{name}: {message}"))


def _size_text(value) -> str:
    """A patch size as its token: ``5`` -> "5", ``(3, 7)`` -> "3x7", ``"2%"`` unchanged."""
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return str(value)


def _check_values(cfg) -> None:
    """Each field alone: its type, range or choice; normalises paths, sizes and lists to the command's text."""
    for name in ("checkpoint", "dataset", "output", "imagenet_patch_file"):
        value = getattr(cfg, name)
        if value is None and name != "checkpoint":
            continue
        if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
            raise _field_error(name, f"expected a path or name (text), got {value!r}")
        _set(cfg, name, str(os.fspath(value)))
    if cfg.model_modules is not None:
        if isinstance(cfg.model_modules, (str, bytes, os.PathLike)) or not all(isinstance(m, (str, os.PathLike)) for m in cfg.model_modules):
            raise CertifyError(f"model_modules must be a list of .py files or dotted module names, got {cfg.model_modules!r}")
        _set(cfg, "model_modules", tuple(str(os.fspath(m)) for m in cfg.model_modules))
    if not isinstance(cfg.split, str) or not cfg.split.strip():
        raise _field_error("split", f"expected a split name such as test, got {cfg.split!r}")
    for name in ("patch_sizes", "attack_patch_sizes"):
        value = getattr(cfg, name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # one square size: 5 is "5"
        if value is not None and not isinstance(value, str):
            try:
                value = ",".join(_size_text(v) for v in value)
            except TypeError:
                raise _field_error(name, f"expected comma-separated sizes like '5,3x7' or a list of sizes, got {value!r}") from None
            _set(cfg, name, value)
    if cfg.mask_patch_size is not None:
        from ..geometry import parse_patch_size

        _set(cfg, "mask_patch_size", _size_text(cfg.mask_patch_size))
        try:  # checked now, not only once a PatchCleanser file is read ("" was taken as not given)
            parse_patch_size(cfg.mask_patch_size)
        except (TypeError, ValueError) as e:
            raise CertifyError(one_line(f"--mask-patch-size: {e}")) from None
    if cfg.attacks is None:  # as run_certification(attacks=None) always took it: no attack
        _set(cfg, "attacks", "")
    if not isinstance(cfg.attacks, str):
        try:
            _set(cfg, "attacks", ",".join(str(a) for a in cfg.attacks))
        except TypeError:
            raise _field_error("attacks", f"expected attack names like 'pgd,universal' or a list of them, got {cfg.attacks!r}") from None
    if cfg.double_masking_clip is not None and not isinstance(cfg.double_masking_clip, str):
        try:
            _set(cfg, "double_masking_clip", ",".join(str(v) for v in cfg.double_masking_clip))
        except TypeError:
            raise _field_error("double_masking_clip", f"expected 'LOW,HIGH' or a pair of numbers, got {cfg.double_masking_clip!r}") from None
    for name in ("dense", "robust_masking", "double_masking", "skip_bad_images", "cache", "overwrite", "progress", "quiet"):
        if not isinstance(getattr(cfg, name), bool):
            raise _field_error(name, f"must be True or False, got {getattr(cfg, name)!r}")
    for name, choices, optional in (("aggregation", AGGREGATIONS, True), ("double_masking_evidence", DOUBLE_MASKING_EVIDENCE, True),
                                    ("certifier", CERTIFIERS, True), ("precision", PRECISIONS, False),
                                    ("data_path", DATA_PATHS, False), ("attack_surrogate", ATTACK_SURROGATES, False)):
        value = getattr(cfg, name)
        if not (value is None and optional) and value not in choices:
            raise _field_error(name, f"must be one of {', '.join(choices)}{' or None' if optional else ''}, got {value!r}")
    checks = (("num_images", _checks.positive_int, True), ("batch_size", _checks.positive_int, False),
              ("threads", _checks.positive_int, True), ("device", _checks.device, False), ("workers", _checks.workers, False),
              ("seed", _any_int, False), ("peer_batch_size", _any_int, False), ("attack_steps", _any_int, False),
              ("attack_locations", _any_int, False), ("attack_images", _any_int, True),
              ("universal_fit_images", _any_int, False), ("attack_step_size", _checks.parse_number, False))
    for name, check, optional in checks:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        try:
            _set(cfg, name, check(value))
        except ValueError as e:
            raise _field_error(name, e) from None


def _any_int(value) -> int:
    return _checks.int_at_least(value, -(2 ** 63), "an integer")


def _check_combinations(cfg) -> None:
    """The options together, as ``bagcert certify`` checks them before reading anything (its one-line messages)."""
    attacks = parse_attacks(cfg.attacks)
    unused = [f for f, v in (("--attack-patch-sizes", cfg.attack_patch_sizes), ("--attack-images", cfg.attack_images)) if v is not None]
    if unused and not attacks:
        from ..empirical import ATTACK_NAMES

        raise CertifyError(f"{' and '.join(unused)} apply only with --attacks (no attack runs without it); give --attacks "
                           f"{ATTACK_NAMES[0]},... or drop {' and '.join(unused)}")
    if cfg.data_path == "memory":
        check_workers_apply(cfg.workers, "memory", "memory")
    if cfg.peer_batch_size < 1:
        raise CertifyError(f"--peer-batch-size must be >= 1, got {cfg.peer_batch_size}")
    if cfg.patch_sizes is not None:
        size_tokens("--patch-sizes", cfg.patch_sizes)
    if cfg.attack_patch_sizes:
        size_tokens("--attack-patch-sizes", cfg.attack_patch_sizes)
    if cfg.robust_masking and attacks:
        raise CertifyError("--robust-masking cannot be combined with --attacks: the attacks optimise the vote count, not "
                           "the masked prediction, so they would not test its certificate; certify without --attacks")
    if cfg.robust_masking and cfg.aggregation:
        raise CertifyError(f"--robust-masking cannot be combined with --aggregation {cfg.aggregation}: robust masking "
                           "certifies the votes with its own rule; give one of the two")
    if cfg.skip_bad_images:
        check_skip_bad_images(cfg, attacks)
    if cfg.double_masking:
        for flag, given in (("--attacks", bool(attacks)), ("--aggregation", bool(cfg.aggregation)),
                            ("--robust-masking", cfg.robust_masking)):
            if given:
                why = {"--attacks": "the attacks optimise the vote count, not the double-masking prediction, so they would "
                                    "not test its certificate; certify without --attacks",
                       "--aggregation": "double masking certifies the votes with its own rule; give one of the two",
                       "--robust-masking": "they are two different certificates of the votes; give one of the two"}[flag]
                raise CertifyError(f"--double-masking cannot be combined with {flag}: {why}")
    if cfg.precision != "fp32" and (cfg.robust_masking or cfg.double_masking):
        flag = "--robust-masking" if cfg.robust_masking else "--double-masking"
        raise CertifyError(f"--precision {cfg.precision} applies to the vote-count certificate; {flag} runs in fp32")
    double_masking_options(cfg)
    check_certifier_option(cfg, attacks)
    # the attack settings are checked whether or not --attacks is given: a bad value is a mistake either way
    for flag, value in (("--attack-steps", cfg.attack_steps), ("--attack-locations", cfg.attack_locations)):
        if value < (0 if flag == "--attack-steps" else 1):
            raise CertifyError(f"{flag} must be {'>= 0' if flag == '--attack-steps' else '>= 1'}, got {value}")
    if cfg.attack_images is not None and cfg.attack_images < 1:
        raise CertifyError(f"--attack-images must be >= 1, got {cfg.attack_images}")
    if not 0 < cfg.attack_step_size <= 1:
        raise CertifyError(f"--attack-step-size is a signed-gradient step in [0, 1] pixel units and must lie in (0, 1], "
                           f"got {cfg.attack_step_size}")
    if cfg.universal_fit_images < 0:
        raise CertifyError(f"--universal-fit-images must be >= 0, got {cfg.universal_fit_images}")
    if attacks:
        if cfg.data_path == "stream":
            raise CertifyError("--data-path stream: --attacks need the images in memory; use --data-path memory (or auto)")


def _with(cfg: CertifyConfig, **changes) -> CertifyConfig:
    """A copy of ``cfg`` with values the run resolved (the checkpoint's file, the bundled dataset, the shipped
    certificate), not checked again: the shipped certificate sets double masking, which the user may not combine with
    ``certifier``."""
    out = copy.copy(cfg)
    for k, v in changes.items():
        _set(out, k, v)
    return out


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def certify_run(config: CertifyConfig) -> Optional[CertifyResult]:
    """Run ``bagcert certify`` for ``config``: certify the checkpoint on the dataset (optionally attack it) and write
    the report folder (results.json, per_sample.csv, summary.md, certified_accuracy.png with matplotlib) into
    ``config.output``.

    Returns a :class:`CertifyResult` on rank 0 (also outside torchrun), None on the other ranks. Prints no result on
    stdout; stderr gets the data path and the certificate used (and progress bars with ``progress``, the attack log
    unless ``quiet``). Raises :class:`CertifyError` (a ``ValueError``) with one line for any mistake in the input (the
    checkpoint, the dataset, a patch size against the images, the output folder, an attack that cannot run, an image
    that cannot be decoded), before anything is written; a certified sample broken by an attack is not an error
    (``result.broken``). Always leaves the process group it joined (without waiting for the other ranks when the run
    fails)."""
    if not isinstance(config, CertifyConfig):
        raise TypeError(f"certify_run takes a CertifyConfig, got {type(config).__name__}")
    from ..training import leave_process_group

    try:
        with bad_image_errors():  # a file the stream path cannot decode mid-run: one line naming it
            out = _run(config)
    except BaseException:  # an error or a signal: a peer may be gone, so no barrier (no gloo traceback after the message)
        leave_process_group(failed=True)
        raise
    leave_process_group()
    return out


def _run(cfg: CertifyConfig) -> Optional[CertifyResult]:
    from ..evaluation import StreamSource, certify_dataset, size_key
    from ..peers import certify_peer_dataset
    from ..peers.classifiers import FORMAT as PEER_FORMAT
    from ..report import ReportFolderError, sample_provenance, write_certification_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")

    # ---- 1. the options alone (checked when the config was built; nothing read, nothing written) --------------
    attacks = parse_attacks(cfg.attacks)
    check_one_process(cfg, world)
    tokens = size_tokens("--patch-sizes", cfg.patch_sizes) if cfg.patch_sizes is not None else None
    attack_tokens = size_tokens("--attack-patch-sizes", cfg.attack_patch_sizes) if cfg.attack_patch_sizes else None
    dm_evidence, dm_clip = double_masking_options(cfg)
    # ---- 2. the report folder: checked now, written only after the work (staged, then moved into place) --------
    output = DEFAULT_OUTPUT if cfg.output is None else cfg.output
    dataset_given = cfg.dataset if cfg.dataset is not None else shipped.samples_path("cifar10")  # the bundled images too
    folder = prepare_output(output, cfg.overwrite, default_folder=cfg.output is None, dataset=dataset_given) if rank == 0 else None

    # ---- 3. the checkpoint (a shipped model's name or a file; a peer classifier is recognised by its format) ----
    import_model_modules(cfg.model_modules)  # models of the user's own, before the file is read
    checkpoint, checkpoint_name, dataset = resolve_inputs(cfg)
    cfg = _with(cfg, checkpoint=checkpoint, dataset=dataset)
    is_peer = checkpoint_format(cfg.checkpoint) == PEER_FORMAT
    if is_peer and cfg.certifier:
        raise CertifyError(f"--certifier applies to bagcert models only; {cfg.checkpoint} is a peer classifier, certified "
                           "by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    several = tokens is not None and len(tokens) > 1
    shipped_cert = None if is_peer else shipped_certifier(cfg, checkpoint_name, attacks, several, rank)
    if shipped_cert is not None:
        clip = cfg.double_masking_clip if shipped_cert["clip"] is None else ",".join(f"{float(v):g}" for v in shipped_cert["clip"])
        cfg = _with(cfg, double_masking=True, double_masking_evidence=shipped_cert["evidence"], double_masking_clip=clip)
        dm_evidence, dm_clip = double_masking_options(cfg)
    if is_peer and cfg.robust_masking:
        raise CertifyError(f"--robust-masking applies to bagcert models only; {cfg.checkpoint} is a peer classifier, "
                           "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    if is_peer and cfg.double_masking:
        raise CertifyError(f"--double-masking applies to bagcert models only; {cfg.checkpoint} is a peer classifier, "
                           "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    peer = load_peer(cfg, attacks) if is_peer else None
    if peer is None and cfg.mask_patch_size:
        raise CertifyError("--mask-patch-size applies only to a PatchCleanser peer classifier (bagcert train --peer patchcleanser:P)")
    if peer is None:
        from ..checkpoint import load_checkpoint

        with user_errors(f"--checkpoint {cfg.checkpoint}: "):
            model, meta = load_checkpoint(cfg.checkpoint)
        if cfg.dense:
            from ..models import to_dense

            with user_errors(f"--dense: {cfg.checkpoint}: "):
                model = to_dense(model)
    else:
        model, meta = peer["classifier"], peer["metadata"]
    size = checkpoint_input_size(meta, cfg.checkpoint)
    if tokens is None:
        text = DEFAULT_PATCH_SIZES if peer is None or peer["mask_patch"] is None else size_key(peer["mask_patch"])
        if shipped_cert is not None:
            text = shipped.shipped_models()[checkpoint_name].card_patch  # one mask set: the card's patch size
        tokens = size_tokens("--patch-sizes", text)

    # ---- 4. the data (in memory or streamed), and the sizes against the images ------------------------------
    data, streamed, data_reason = open_data(cfg, meta, size, model.num_classes, attacks, world)
    if rank == 0:
        print(f"data path: {data_reason}", file=sys.stderr, flush=True)
        if cfg.data_path == "auto":
            check_workers_apply(cfg.workers, "auto", "stream" if streamed else "memory")
    if len(data.classes) != model.num_classes:
        raise CertifyError(f"dataset has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes) and data.name != "synthetic":
        raise CertifyError(f"dataset classes {data.classes} differ from the checkpoint's classes {meta['classes']}")
    H, W = image_hw(data)
    with user_errors("--patch-sizes: "):
        sizes = resolve_size_tokens("--patch-sizes", tokens, (H, W))
    area_sizes = {t: f"{s[0]}x{s[1]}" for t, s in zip(tokens, sizes) if t.endswith("%")}
    too_large = [t for t, (ph, pw) in zip(tokens, sizes) if ph > H or pw > W]
    if too_large:
        raise CertifyError(f"--patch-sizes {', '.join(too_large)}: larger than the {H}x{W} images")
    keys = [size_key(s) for s in sizes]
    if peer is None:  # the geometry the certificate uses, checked on these images (registry models are trusted)
        from ..geometry_inference import verify_geometry

        with user_errors(f"--checkpoint {cfg.checkpoint}: "):
            verify_geometry(model, (H, W))
    if cfg.robust_masking and len(keys) > 1:
        raise CertifyError(f"--robust-masking certifies one patch size per run (got {', '.join(keys)}): its prediction masks a "
                           "window made for the patch size, so clean accuracy and predictions differ per size; give one size, "
                           "e.g. --patch-sizes 5")
    attack_keys = None
    if attacks and attack_tokens:
        with user_errors("--attack-patch-sizes: "):
            attack_keys = [size_key(s) for s in resolve_size_tokens("--attack-patch-sizes", attack_tokens, (H, W))]
        bad = [t for t, k in zip(attack_tokens, attack_keys) if k not in keys]
        if bad:
            raise CertifyError(f"--attack-patch-sizes {', '.join(bad)} are not among --patch-sizes {', '.join(tokens)}")
    if cfg.num_images is not None:
        if cfg.num_images > len(data):
            raise CertifyError(f"--num-images {cfg.num_images} is larger than the data set ({len(data)} images in "
                               f"{cfg.dataset}, split {data.info.get('split', cfg.split)}); give at most {len(data)}")
        if cfg.num_images < len(data):
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
            keep = perm[: cfg.num_images].sort().values
            info = dict(data.info)
            data = data.subset(keep)  # keeps each image's index into the whole dataset and its source file
            if streamed:
                data.info = dict(info, subset=len(data))
    if attacks:
        if cfg.attack_images is not None and cfg.attack_images > len(data):
            raise CertifyError(f"--attack-images {cfg.attack_images} is larger than the {len(data)} certified images")
        from ..empirical import check_attacks

        with user_errors("--attacks: "):
            check_attacks(attacks, model, data, metadata=meta, imagenet_patch_path=cfg.imagenet_patch_file)
    method = None
    if peer is not None:
        method = check_peer_sizes(peer, (H, W), sizes)
    model.to(cfg.device).eval()

    # ---- 5. the work ----------------------------------------------------------------------------------------
    progress = cfg.progress and not cfg.quiet and rank == 0
    skip_file = None
    if streamed and cfg.skip_bad_images:
        from ..streaming import SkipBadImages

        skip_dir = tempfile.TemporaryDirectory(prefix="bagcert-skipped-")
        skip_file = Path(skip_dir.name) / "skipped.tsv"
        source = StreamSource(SkipBadImages(data, skip_file), workers=cfg.workers)
    else:
        source = StreamSource(data, workers=cfg.workers) if streamed else data
    config_extra = {} if shipped_cert is None else {"shipped_certifier": shipped_cert}
    if cfg.robust_masking:
        from ..peers import PatchGuardMasking

        masking = PatchGuardMasking(evidence="votes")
        if rank == 0:
            print(f"certificate: {masking.name}, PatchGuard robust masking of the votes (not the vote count)",
                  file=sys.stderr, flush=True)
        results, timing = certify_peer_dataset(
            masking, model, source, sizes, batch_size=cfg.batch_size, device=cfg.device, progress=progress,
            rank=rank, world=world,
        )
        method = {"method": masking.name, "forward_passes_per_image": masking.forward_passes_per_image(), "peer": None}
    elif cfg.double_masking:
        from ..peers import LocalDoubleMasking

        mask_patch = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        masking = LocalDoubleMasking(evidence=dm_evidence, clip=dm_clip, mask_patch_size=mask_patch)
        ms = masking.mask_set(model.geometry, (H, W), mask_patch)
        config_extra["double_masking_mask_set"] = {"mask_patch_size": list(mask_patch), **ms.to_dict()}
        config_extra["double_masking_evidence"] = dm_evidence
        config_extra["double_masking_clip"] = None if masking.clip is None else list(masking.clip)
        what = ("the votes" if dm_evidence == "votes"
                else f"the local logits clipped to ({masking.clip[0]:g}, {masking.clip[1]:g})")
        if rank == 0:
            print(f"certificate: {masking.name}, double masking of {what} on the local map (not the vote count); mask "
                  f"set: {ms.num_masks} windows of {ms.mask_size[0]}x{ms.mask_size[1]} locations covering every "
                  f"{mask_patch[0]}x{mask_patch[1]} patch, one mask set for every patch size", file=sys.stderr, flush=True)
        results, timing = certify_peer_dataset(
            masking, model, source, sizes, batch_size=cfg.batch_size, device=cfg.device, progress=progress,
            rank=rank, world=world,
        )
        method = {"method": masking.name, "forward_passes_per_image": masking.forward_passes_per_image(), "peer": None}
    elif peer is None:
        results, timing = certify_dataset(
            model, source, sizes, batch_size=cfg.batch_size, device=cfg.device, aggregation=cfg.aggregation,
            progress=progress, rank=rank, world=world, precision=cfg.precision,
        )
        method = {"method": "bagcert", "forward_passes_per_image": 1, "peer": None}
    else:
        results, timing = certify_peer_dataset(
            peer["certifier"], model, source, sizes, mask_set=peer.get("mask_set"), batch_size=cfg.batch_size,
            device=cfg.device, progress=progress, rank=rank, world=world,
        )
    skipped = None
    if skip_file is not None:
        results, skipped = drop_skipped(results, data, skip_file)
        skip_dir.cleanup()
    if world > 1:
        t = torch.tensor([timing["forward_s"], timing["certify_s"], timing["total_s"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        timing.update(forward_s=float(t[0]), certify_s=float(t[1]), total_s=float(t[2]))
    if rank != 0:
        return None
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CertifyConfig)}
    config["model_modules"] = None if cfg.model_modules is None else list(cfg.model_modules)
    config["output"] = str(output)
    config["checkpoint_name"] = checkpoint_name
    config["patch_sizes"] = keys
    if area_sizes:
        config["patch_area_sizes"] = area_sizes
    config["world_size"] = world
    config["data_path"] = "stream" if streamed else "memory"
    config["data_path_requested"] = cfg.data_path
    config["data_path_reason"] = data_reason
    config.update(config_extra)
    dataset_record = {"name": data.name, "root": data.info.get("root"), "split": data.info.get("split", cfg.split)}
    if "seeded_split" in data.info:
        dataset_record["seeded_split"] = data.info["seeded_split"]
    summary_keys = ("dataset", "epochs", "wall_seconds", "eval")
    if peer is None:
        ckpt = {"path": str(cfg.checkpoint), "model": model.config["name"], "model_kwargs": model.config["kwargs"]}
        if checkpoint_name:
            ckpt["name"] = checkpoint_name  # a shipped model, addressed by its name or its file
    else:
        ckpt = {"path": str(cfg.checkpoint), "format": PEER_FORMAT, "model": model.config["backbone"],
                "model_kwargs": model.config["model_kwargs"], "in_channels": model.config["in_channels"]}
        summary_keys += ("peer",)
    ckpt["metadata_summary"] = {k: meta[k] for k in summary_keys if k in meta}
    stage = folder.stage()
    try:
        empirical = None
        if attacks:
            from ..empirical import run_empirical_evaluation

            empirical = run_empirical_evaluation(
                model, data, results, attacks, patch_sizes=attack_keys, num_images=cfg.attack_images, steps=cfg.attack_steps,
                step_size=cfg.attack_step_size, locations=cfg.attack_locations, surrogate=cfg.attack_surrogate, seed=cfg.seed,
                universal_fit_images=cfg.universal_fit_images, metadata=meta, imagenet_patch_path=cfg.imagenet_patch_file,
                device=cfg.device, output=stage, log=None if cfg.quiet else lambda m: print(m, file=sys.stderr, flush=True),
                **progress_kwarg(progress),
            )
        provenance = stream_provenance(data) if streamed else sample_provenance(data)
        if skipped is not None:
            provenance, dataset_record["skipped_images"] = skip_record(provenance, skipped)
        summary = write_certification_report(
            stage, results, timing, config, dataset_record, ckpt, device=cfg.device, empirical=empirical, method=method,
            provenance=provenance, run_id=folder.run_id,
        )
        markdown = (stage / "summary.md").read_text()
        folder.commit()
    except ReportFolderError as e:
        raise CertifyError(f"--output: {one_line(e)}") from e
    finally:
        folder.discard()  # after a failure: no half-written report anywhere (a kept report is handed over)
    return CertifyResult(summary, empirical, markdown)


# ------------------------------------------------------------------------------------------------
# the keyword API of earlier versions
# ------------------------------------------------------------------------------------------------
_EXPLICIT = ("checkpoint", "dataset", "patch_sizes", "output", "overwrite")


def run_certification(checkpoint=DEFAULT_CHECKPOINT, dataset=DEFAULT_DATASET, patch_sizes=None, *, output=None,
                      overwrite: bool = False, config: Optional[CertifyConfig] = None, **options) -> dict:
    """Certify ``checkpoint`` on ``dataset`` and return the report's summary (the ``results.json`` document).

    The same run as ``bagcert certify`` without an argument vector: ``patch_sizes`` is a list of sizes (``5``,
    ``"3x7"``, ``(3, 7)``, ``"2%"``) or a comma-separated string (default: the CLI's); ``output`` the report
    folder (None: the report is built in a temporary folder and removed, only the summary is returned);
    ``overwrite``: replace a report already in ``output``. ``options`` are the CLI's other options by their
    argument names, the fields of :class:`CertifyConfig` (``split``, ``num_images``, ``batch_size``, ``device``,
    ``aggregation``, ``data_path``, ``workers``, ``seed``, ``threads``, ``attacks``, ``attack_images``, ...); progress
    bars are off unless ``progress=True`` and the attack log is silent unless ``quiet=False``. Nothing goes to stdout; stderr gets the
    data-path note and the certificate used.

    ``config=CertifyConfig(...)`` instead runs that config as it is (:func:`certify_run`; its ``output`` None is the
    default folder ``outputs/certify``), given alone.

    Under torchrun every rank must call it; ranks other than 0 return an empty dict. Raises ``ValueError``
    (:class:`CertifyError`) with the CLI's one-line message for any mistake in the input (unknown option, bad
    checkpoint, dataset, patch size, output folder, ...).
    """
    if config is not None:
        given = [k for k, v, d in (("checkpoint", checkpoint, DEFAULT_CHECKPOINT), ("dataset", dataset, DEFAULT_DATASET),
                                   ("patch_sizes", patch_sizes, None), ("output", output, None), ("overwrite", overwrite, False))
                 if v != d] + sorted(options)
        if given:
            raise CertifyError(f"run_certification: config= is given with {', '.join(given)}; give the config alone "
                               "(set these as its fields: dataclasses.replace(config, ...))")
        if not isinstance(config, CertifyConfig):
            raise TypeError(f"run_certification: config must be a CertifyConfig, got {type(config).__name__}")
        out = certify_run(config)
        return {} if out is None else out.summary
    names = {f.name for f in dataclasses.fields(CertifyConfig)}
    unknown = sorted(set(options) - (names - set(_EXPLICIT)))
    if unknown:
        raise CertifyError(f"run_certification: unknown option(s) {', '.join(unknown)}; expected CLI option names such as "
                           "split, num_images, batch_size, device, data_path")
    values = {"progress": False, "quiet": True, **options}  # a given quiet is checked and kept, not overridden
    common = dict(checkpoint=checkpoint, dataset=dataset, patch_sizes=patch_sizes, overwrite=overwrite, **values)  # checked, not bool()
    if output is not None:
        out = certify_run(CertifyConfig(output=output, **common))
    else:
        with tempfile.TemporaryDirectory(prefix="bagcert-certify-") as tmp:
            out = certify_run(CertifyConfig(output=str(Path(tmp) / "report"), **common))
    return {} if out is None else out.summary
