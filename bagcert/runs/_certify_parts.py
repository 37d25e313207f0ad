"""The steps of :func:`bagcert.runs.certify.certify_run`: input checks, data opening (in memory or streamed), patch
sizes, the shipped model's certificate, peer classifiers and unreadable images. Every mistake in the input is a
:class:`CertifyError` with one line naming the option (``--patch-sizes: ...``, as ``bagcert certify`` prints it);
nothing here exits the process."""

from __future__ import annotations

import contextlib
import math
import os
import sys

import torch

from .. import shipped
from ..empirical import ATTACK_NAMES
from . import _io
from ._io import one_line, show_path

DATA_PATHS = ("auto", "memory", "stream")


class CertifyError(ValueError):
    """A mistake in a certification run's input (an option, the checkpoint, the dataset, the output folder, an image
    that cannot be read): the message is one line saying what was wrong and what was expected. ``bagcert certify``
    prints it and exits with status 1; the original error, if any, is the ``__cause__``."""


# ------------------------------------------------------------------------------------------------
# generic pieces: one-line errors, paths, the report folder
# ------------------------------------------------------------------------------------------------
def user_errors(prefix: str = ""):
    """Turn the library's errors about the user's input raised inside the block -- ``CheckpointError``,
    ``DatasetError``, ``ReportFolderError``, ``PatchFileError`` and the ``ValueError`` / ``TypeError`` of argument
    checks -- into :class:`CertifyError` ``"<prefix><message>"`` (one line). A :class:`CertifyError` passes unchanged.
    Wrap only the steps that read and check the user's input, never the computation (:func:`bagcert.runs._io.input_errors`)."""
    return _io.input_errors(prefix, CertifyError, passing=(CertifyError,))


def prepare_output(path, overwrite: bool = False, default_folder: bool = False, dataset=None):
    """The :class:`~bagcert.report.ReportFolder` of ``path``, checked before any work (:func:`bagcert.runs._io.prepare_output`);
    a folder that cannot take the report is a :class:`CertifyError`."""
    with user_errors():
        return _io.prepare_output(path, overwrite, default_folder, dataset)


def import_model_modules(modules) -> None:
    """:func:`bagcert.runs._io.import_model_modules`; a module that cannot be imported is a :class:`CertifyError`."""
    with user_errors():
        _io.import_model_modules(modules)


def check_workers_apply(workers_given: int | None, requested: str, chosen: str, flag: str = "--workers") -> None:
    """:func:`bagcert.runs._io.check_workers_apply`; ``--workers`` with ``--data-path memory`` is a :class:`CertifyError`."""
    with user_errors():
        _io.check_workers_apply(workers_given, requested, chosen, flag)


def checkpoint_input_size(meta: dict, path, default: int = 32) -> int:
    """:func:`bagcert.runs._io.checkpoint_input_size`; malformed metadata is a :class:`CertifyError` naming the file."""
    with user_errors():
        return _io.checkpoint_input_size(meta, path, default)


# ------------------------------------------------------------------------------------------------
# options alone
# ------------------------------------------------------------------------------------------------
def percent(token: str) -> float:
    try:
        value = float(token[:-1])
    except ValueError:
        raise ValueError(f"patch size {token!r} is not understood: expected a percentage of the image area like '2%'") from None
    if not 0 < value <= 100:
        raise ValueError(f"patch area {token!r} must lie in (0, 100] %")
    return value


def size_tokens(flag: str, text: str) -> list:
    """The comma-separated size tokens of ``flag``, each checked alone; duplicates are found once the image size is
    known (:func:`resolve_size_tokens`)."""
    from ..geometry import parse_patch_size

    tokens = [s.strip() for s in text.split(",") if s.strip()]
    if not tokens:
        raise CertifyError(f"{flag} is empty; give e.g. 1,2,5 or 3x7 or 2%")
    with user_errors(f"{flag}: "):
        for t in tokens:
            percent(t) if t.endswith("%") else parse_patch_size(t)
    return tokens


def resolve_size_tokens(flag: str, tokens, image_size) -> list:
    """``[(h, w), ...]`` for the size tokens of ``flag`` (percentages resolved for ``image_size``); a size given
    twice (``5,5`` or ``5,5x5`` or ``2%,5`` when 2 % is 5x5) is refused naming both tokens."""
    from ..evaluation import size_key
    from ..geometry import parse_patch_size, patch_side_for_area

    seen, out = {}, []
    for t in tokens:
        if t.endswith("%"):
            side = patch_side_for_area(percent(t), image_size)
            size = (side, side)
        else:
            size = parse_patch_size(t)
        key = size_key(size)
        if key in seen:
            same = key if "x" in key else f"{key}x{key}"
            raise CertifyError(f"{flag}: {seen[key]!r} and {t!r} are the same patch size ({same}); give each size once")
        seen[key] = t
        out.append(size)
    return out


def parse_attacks(text: str) -> list:
    import difflib

    names = [a.strip() for a in (text or "").split(",") if a.strip()]
    for a in names:
        if a not in ATTACK_NAMES:
            close = difflib.get_close_matches(a, ATTACK_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CertifyError(f"--attacks: unknown attack {a!r}{hint}; choose from {', '.join(ATTACK_NAMES)}")
    return list(dict.fromkeys(names))


def double_masking_options(cfg) -> tuple:
    """(evidence, clip) of --double-masking from --double-masking-evidence and --double-masking-clip: ("votes", None)
    by default, clip (low, high) floats or None (the certifier's default (-1, 1)) for logits. Refuses either option
    without --double-masking, a clip with votes and a clip that is not two finite numbers LOW < HIGH."""
    evidence, clip_text = cfg.double_masking_evidence, cfg.double_masking_clip
    for flag, value in (("--double-masking-evidence", evidence), ("--double-masking-clip", clip_text)):
        if value is not None and not cfg.double_masking:
            raise CertifyError(f"{flag} applies only with --double-masking; add --double-masking or drop {flag}")
    evidence = evidence or ("logits" if clip_text is not None else "votes")
    if clip_text is None:
        return evidence, None
    if evidence == "votes":
        raise CertifyError("--double-masking-clip applies to --double-masking-evidence logits only; votes are already "
                           "{0, 1}")
    parts = str(clip_text).split(",")
    try:
        low, high = (float(v) for v in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise CertifyError(f"--double-masking-clip must be two finite numbers LOW,HIGH with LOW < HIGH (e.g. -1,1), "
                           f"got {clip_text!r}")
    return evidence, (low, high)


def check_certifier_option(cfg, attacks) -> None:
    """Refuse --certifier with an option that names another certificate, and --certifier shipped with --attacks or
    --precision bf16."""
    if cfg.certifier is None:
        return
    for flag, given in (("--double-masking", cfg.double_masking), ("--robust-masking", cfg.robust_masking),
                        ("--aggregation", bool(cfg.aggregation))):
        if given:
            raise CertifyError(f"--certifier {cfg.certifier} cannot be combined with {flag}: both choose the certificate; "
                               "give one of the two")
    if cfg.certifier == "shipped" and attacks:
        raise CertifyError("--certifier shipped cannot be combined with --attacks: the attacks optimise the vote count, so "
                           "they test the vote certificate; give --certifier votes (or drop --certifier) to attack")
    if cfg.certifier == "shipped" and cfg.precision != "fp32":
        raise CertifyError(f"--certifier shipped cannot be combined with --precision {cfg.precision}: --precision applies "
                           "to the vote-count certificate; the shipped certificate runs in fp32")


def check_skip_bad_images(cfg, attacks) -> None:
    """Refuse ``--skip-bad-images`` with --attacks (they need the images in memory) or --data-path memory (a memory
    load decodes everything first); the one-process rule is checked by the run (:func:`check_one_process`)."""
    if attacks:
        raise CertifyError("--skip-bad-images reads the images one by one on the stream path; --attacks need them in memory: "
                           "give one of the two (remove the bad files to attack)")
    if cfg.data_path == "memory":
        raise CertifyError("--skip-bad-images reads the images one by one on the stream path: leave --data-path at auto or "
                           "stream")


def check_one_process(cfg, world: int) -> None:
    if cfg.skip_bad_images and world > 1:
        raise CertifyError("--skip-bad-images runs in one process (not under torchrun)")


# ------------------------------------------------------------------------------------------------
# the checkpoint: a shipped model's name, its certificate, a peer classifier
# ------------------------------------------------------------------------------------------------
def resolve_inputs(cfg) -> tuple:
    """``(checkpoint, checkpoint_name, dataset)``: a shipped model's name in ``checkpoint`` becomes its file (as the
    tools print paths) and a missing ``dataset`` the bundled samples; ``checkpoint_name`` is the shipped model's name,
    also when its file was given, else None. A name that is neither a file nor a shipped model is one line listing
    the shipped names."""
    from ..checkpoint import CheckpointError

    given = str(cfg.checkpoint)
    try:
        path = shipped.resolve_checkpoint(given)
    except CheckpointError as e:
        raise CertifyError(one_line(f"--checkpoint {given}: {e}")) from e
    if given in shipped.model_names():
        name, checkpoint = given, show_path(path)
    else:
        name, checkpoint = shipped.shipped_name(path), given
    dataset = show_path(shipped.samples_path("cifar10")) if cfg.dataset is None else cfg.dataset
    return checkpoint, name, dataset


def shipped_certifier(cfg, name, attacks, several: bool, rank: int) -> dict | None:
    """The shipped model's own certificate (shipped.json "certifier") when the user chose no certificate and one patch
    size at most (``several``: more than one given; the vote count certifies each size on its own, a double-masking run
    shares one mask set among them); None for the vote count or the certificate the options ask for. Says on stderr
    which certificate is used and how to get the other."""
    spec = shipped.shipped_certifier(name) if name else None
    if cfg.certifier == "votes":
        if spec is not None and rank == 0:
            print(f"certificate: the vote count (--certifier votes; {name}'s default is "
                  f"double-masking-{spec['evidence']})", file=sys.stderr, flush=True)
        return None
    if spec is None:
        if cfg.certifier == "shipped":
            raise CertifyError(f"--certifier shipped: {name or cfg.checkpoint} has no shipped certificate "
                               "of its own (it is certified by the vote count); drop --certifier")
        return None
    chosen = [f for f, v in (("--double-masking", cfg.double_masking), ("--robust-masking", cfg.robust_masking),
                             ("--aggregation", bool(cfg.aggregation)), ("--attacks", bool(attacks)),
                             ("--precision", cfg.precision != "fp32")) if v]
    if chosen:
        if rank == 0 and not cfg.double_masking and not cfg.robust_masking:
            print(f"certificate: the vote count ({' and '.join(chosen)} given; {name}'s default "
                  f"double-masking-{spec['evidence']} is not used)", file=sys.stderr, flush=True)
        return None
    if several and cfg.certifier is None:
        if rank == 0:
            print(f"certificate: the vote count (several --patch-sizes: it certifies each size on its own; "
                  f"{name}'s default double-masking-{spec['evidence']} certifies one size per run, "
                  "give one size or --certifier shipped)", file=sys.stderr, flush=True)
        return None
    if spec.get("kind") != "double-masking":
        raise CertifyError(f"bagcert/shipped.json: {name} names an unknown certifier {spec.get('kind')!r}")
    if rank == 0:
        print(f"certificate: {name}'s default, double-masking-{spec['evidence']} (give --certifier votes "
              "for the vote count)", file=sys.stderr, flush=True)
    return spec


def checkpoint_format(path) -> str | None:
    """The ``format`` entry of a checkpoint file, read without loading its tensors (memory-mapped,
    ``weights_only=True``); None when it cannot be read this way (the real loader then says why)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, foreign: load_checkpoint reports it with a clear message
        return None
    return obj.get("format") if isinstance(obj, dict) else None


def load_peer(cfg, attacks) -> dict:
    """Load a peer classifier and its certifier, and refuse the options that do not apply to it."""
    from ..geometry import parse_patch_size
    from ..peers import PatchCleanser, PeerSpec, load_peer_certifier

    if cfg.aggregation:
        raise CertifyError(
            f"--aggregation {cfg.aggregation} applies to bagcert models only; {cfg.checkpoint} is a peer classifier, "
            "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)"
        )
    if cfg.dense:
        raise CertifyError(f"--dense applies to bagcert models only; {cfg.checkpoint} is a peer classifier")
    if cfg.precision != "fp32":
        raise CertifyError(f"--precision {cfg.precision} applies to bagcert models only; {cfg.checkpoint} is a peer classifier")
    if attacks:
        raise CertifyError(
            f"--attacks does not apply to peer classifiers ({cfg.checkpoint}): the attacks and their soundness check "
            "need a bagcert model (local logits and receptive-field geometry) and attack its own prediction, not a "
            "peer's defended prediction; certify without --attacks"
        )
    with user_errors(f"--checkpoint {cfg.checkpoint}: "):  # unreadable file, or a recorded spec this version cannot parse
        cert, clf, meta = load_peer_certifier(cfg.checkpoint, batch_size=cfg.peer_batch_size)
    spec = PeerSpec.from_dict(meta["peer"])
    peer = {"certifier": cert, "classifier": clf, "metadata": meta, "spec": spec, "mask_patch": None}
    if isinstance(cert, PatchCleanser):
        mask_patch = tuple(spec.patch_size)
        if cfg.mask_patch_size:
            try:
                mask_patch = parse_patch_size(cfg.mask_patch_size)
            except (TypeError, ValueError) as e:
                raise CertifyError(f"--mask-patch-size: {e}") from e
        peer["mask_patch"] = mask_patch
        peer["mask_patch_rebuilt"] = mask_patch != tuple(spec.patch_size)
    elif cfg.mask_patch_size:
        raise CertifyError(f"--mask-patch-size applies only to PatchCleanser; {cfg.checkpoint} is {spec}")
    return peer


def check_peer_sizes(peer: dict, image_size, sizes) -> dict:
    """Check the requested patch sizes against the peer (PatchCleanser: at most its mask set's patch), build
    PatchCleanser's mask set into ``peer``, and return the report's method record."""
    from ..evaluation import size_key
    from ..peers import MaskSet, affected_ablations

    cert, spec = peer["certifier"], peer["spec"]
    H, W = image_size
    try:
        spec.check_image_size((H, W))
    except ValueError as e:
        raise CertifyError(f"the {H}x{W} images do not fit the peer classifier: {e}") from e
    too_large = [size_key(s) for s in sizes if s[0] > H or s[1] > W]
    if too_large:
        raise CertifyError(f"--patch-sizes {too_large} are larger than the {H}x{W} images")
    info = dict(peer["metadata"]["peer"])
    if peer["mask_patch"] is None:  # de-randomized smoothing: any patch size, Δ affected ablations
        info["affected_ablations"] = {size_key(s): affected_ablations((H, W), s, cert.band_size, cert.mode) for s in sizes}
        return {"method": cert.name, "forward_passes_per_image": cert.forward_passes_per_image((H, W), sizes[0]), "peer": info}
    mh, mw = peer["mask_patch"]
    if mh > H or mw > W:
        raise CertifyError(f"--mask-patch-size {mh}x{mw} is larger than the {H}x{W} images")
    bad = [f"{s[0]}x{s[1]}" for s in sizes if s[0] > mh or s[1] > mw]
    if bad:
        trained = "{}x{}".format(*spec.patch_size)
        hint = (
            f"give --patch-sizes within {mh}x{mw} (every smaller patch lies inside one of its masks), or --mask-patch-size "
            "to rebuild the mask set for a larger patch (sound for any classifier, but a different mask set than the "
            f"classifier was trained with, so expect lower accuracy)"
        )
        raise CertifyError(
            f"PatchCleanser classifier {peer['metadata']['peer'].get('spec', spec)} certifies with the mask set built for "
            f"{mh}x{mw} patches{'' if not peer['mask_patch_rebuilt'] else f' (--mask-patch-size; trained for {trained})'}: "
            f"its certificate covers patches up to {mh}x{mw} only, not {', '.join(bad)}; {hint}"
        )
    ms = MaskSet.for_patch((H, W), (mh, mw), cert.k)
    peer["mask_set"] = ms
    info["mask_set"] = {
        "patch_size": [mh, mw], "rebuilt": peer["mask_patch_rebuilt"], "k": list(ms.k), "num_masks": ms.num_masks,
        "mask_size": list(ms.mask_size), "stride": list(ms.stride), "row_starts": list(ms.row_starts),
        "col_starts": list(ms.col_starts), "fill": cert.fill,
    }
    return {"method": cert.name, "forward_passes_per_image": cert.forward_passes_per_image((H, W), (mh, mw)), "peer": info}


# ------------------------------------------------------------------------------------------------
# the data: in memory or streamed
# ------------------------------------------------------------------------------------------------
def load_eval_data(cfg, meta, size, num_classes):
    """The images to certify, decoded into memory. A folder without split sub-folders is cut with the seeded
    split the checkpoint was trained with (``meta['split']``): split ``test`` keeps its test part, ``all`` every
    image (``bagcert.data.load_checkpoint_split``)."""
    from ..data import load_checkpoint_split

    with user_errors(f"--dataset {cfg.dataset} --split {cfg.split}: "):
        data = load_checkpoint_split(cfg.dataset, cfg.split, meta.get("split"), size=size, resize=meta.get("resize"),
                                     seed=cfg.seed, num_classes=num_classes, cache=cfg.cache)
    if len(data) == 0:
        raise CertifyError(f"--dataset {cfg.dataset} --split {cfg.split}: no images to certify")
    return data


def open_eval_stream(cfg, meta, size, num_classes):
    """The images to certify as a :mod:`bagcert.streaming` dataset, resolving the dataset and split to the same images
    in the same order as :func:`load_eval_data` (the checkpoint's seeded split included) without decoding them. Data
    that is held in memory by any loader (``synthetic[:N]``, torchvision's CIFAR-10 batches) is loaded and wrapped
    (:class:`~bagcert.streaming.TensorStream`, attribute ``loaded``)."""
    from ..data import (_check_split_folder, _check_unsplit_name, _find_cifar_batches, _is_synthetic, _no_split_record,
                        _spec_root, _split_folders, cut_seeded_split)
    from ..streaming import TensorStream, open_stream

    spec, split, record = cfg.dataset, cfg.split, meta.get("split")
    root = None if _is_synthetic(spec) else _spec_root(spec)
    if root is None or not root.is_dir() or _find_cifar_batches(root) is not None:
        data = load_eval_data(cfg, meta, size, num_classes)
        stream = TensorStream(data)
        stream.loaded = data
        return stream
    with user_errors(f"--dataset {spec} --split {split}: "):
        splits = _split_folders(root)
        if splits:
            _check_split_folder(spec, root, split, splits)
            return open_stream(spec, split, size=size, resize=meta.get("resize"), seed=cfg.seed, num_classes=num_classes)
        _check_unsplit_name(split)
        stream = open_stream(spec, split, size=size, resize=meta.get("resize"), seed=cfg.seed, num_classes=num_classes)
        if split == "all":
            stream.info["split"] = "all"
            return stream
        if not record:
            raise _no_split_record(spec, split)
        return cut_seeded_split(stream, split, record, spec)  # the same cut as the in-memory path


def open_data(cfg, meta, size, num_classes, attacks, world):
    """``(data, streamed, reason)``: the images to certify on the path ``data_path`` asks for. ``auto`` decides with
    :func:`bagcert.streaming.choose_data_path` on the decoded size of the whole split (times the processes on this
    machine); attacks need the images in memory (``auto`` then takes memory, ``stream`` is refused)."""
    from ..streaming import choose_data_path

    if cfg.data_path == "stream" and attacks:
        raise CertifyError("--data-path stream: --attacks need the images in memory; use --data-path memory (or auto)")
    if cfg.skip_bad_images:  # image by image, so that one bad file costs only itself
        stream = open_eval_stream(cfg, meta, size, num_classes)
        loaded = getattr(stream, "loaded", None)
        if loaded is not None:
            return loaded, False, "memory: the data is held in memory by its loader (--skip-bad-images: nothing to decode)"
        return stream, True, "stream: --skip-bad-images reads the images one by one and skips the files that cannot be decoded"
    if cfg.data_path == "memory" or attacks:
        data = load_eval_data(cfg, meta, size, num_classes)
        c, h, w = data.images.shape[1:]
        if cfg.data_path == "memory":
            return data, False, choose_data_path(len(data) * c * h * w, override="memory")[1]
        return data, False, "memory: --attacks need the images in memory"
    stream = open_eval_stream(cfg, meta, size, num_classes)
    if len(stream) == 0:
        raise CertifyError(f"--dataset {cfg.dataset} --split {cfg.split}: no images to certify")
    base = stream
    while hasattr(base, "base"):
        base = base.base  # the decoded size of the whole folder: what the in-memory path would hold
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    with user_errors("--data-path: "):
        path, reason = choose_data_path(base.decoded_bytes, override=cfg.data_path, copies=max(1, copies))
    if path == "memory":
        loaded = getattr(stream, "loaded", None)
        return (loaded if loaded is not None else load_eval_data(cfg, meta, size, num_classes)), False, reason
    return stream, True, reason


def stream_provenance(stream) -> dict:
    """:func:`bagcert.report.sample_provenance` of a stream: each item's index in the whole dataset and its source
    file, through any subsets."""
    from ..streaming import ImageFolderStream, TensorStream

    pos = torch.arange(len(stream))
    while hasattr(stream, "base"):
        pos, stream = stream.index[pos], stream.base
    if isinstance(stream, TensorStream):
        from ..report import sample_provenance

        whole = sample_provenance(stream.data)
        return {"dataset_index": [whole["dataset_index"][i] for i in pos.tolist()],
                "source": [whole["source"][i] for i in pos.tolist()], "index_base": whole["index_base"]}
    if isinstance(stream, ImageFolderStream):
        return {"dataset_index": pos.tolist(), "source": [stream.source(i) for i in pos.tolist()], "index_base": "dataset"}
    return {"dataset_index": pos.tolist(), "source": [""] * len(pos), "index_base": "dataset"}


def image_hw(data) -> tuple:
    shape = data.image_shape if hasattr(data, "image_shape") else tuple(data.images.shape[1:])
    return int(shape[-2]), int(shape[-1])


# ------------------------------------------------------------------------------------------------
# unreadable images (--skip-bad-images, or one line naming the file)
# ------------------------------------------------------------------------------------------------
def _error_text(e: BaseException) -> str:
    """The message of a DatasetError, also when a DataLoader worker re-raised it (its last line is the original)."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        if text.startswith("bagcert.data.DatasetError:"):
            text = text[len("bagcert.data.DatasetError:"):].strip()
    return " ".join(text.split())


@contextlib.contextmanager
def bad_image_errors():
    """An image that cannot be read during the certification (the stream path decodes as it goes) ends the run with a
    :class:`CertifyError` naming the file and the way on; nothing is written (the report needs every image)."""
    from ..data import DatasetError

    try:
        yield
    except CertifyError:
        raise
    except DatasetError as e:
        raise CertifyError(f"{_error_text(e)}; no report was written: remove or replace the file, or rerun with "
                           "--skip-bad-images to certify the other images (the report then lists the skipped files)") from e


def drop_skipped(results: dict, data, record):
    """``(results without the skipped rows, {position: message} of the skipped images)`` after a run over
    :class:`bagcert.streaming.SkipBadImages`; a run where every image was skipped is a :class:`CertifyError`."""
    from ..certification import CertResult
    from ..evaluation import _FIELDS
    from ..streaming import skipped_images

    bad = skipped_images(record)
    if not bad:
        return results, bad
    n = len(data)
    if len(bad) >= n:
        first = next(iter(bad.values()))
        raise CertifyError(f"none of the {n} images could be decoded (the first: {first}); no report was written")
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(bad)] = False
    out = {k: CertResult(*(getattr(r, f)[keep] for f in _FIELDS), r.patch_size, r.aggregation) for k, r in results.items()}
    return out, bad


def skip_record(provenance: dict, bad: dict):
    """``(provenance of the kept images, the report's dataset.skipped_images record)``: ``{"count", "files",
    "dataset_index", "errors"}`` with each skipped image's source file (as in per_sample.csv), its index in the whole
    dataset and the decoder's message."""
    keep = [i for i in range(len(provenance["dataset_index"])) if i not in bad]
    kept = dict(provenance, dataset_index=[provenance["dataset_index"][i] for i in keep],
                source=[provenance["source"][i] for i in keep])
    record = {
        "count": len(bad),
        "files": [provenance["source"][i] for i in bad],
        "dataset_index": [provenance["dataset_index"][i] for i in bad],
        "errors": list(bad.values()),
    }
    return kept, record


def progress_kwarg(progress: bool) -> dict:
    """``{"progress": progress}`` when :func:`bagcert.empirical.run_empirical_evaluation` takes a progress flag."""
    import inspect

    from ..empirical import run_empirical_evaluation

    return {"progress": progress} if "progress" in inspect.signature(run_empirical_evaluation).parameters else {}
