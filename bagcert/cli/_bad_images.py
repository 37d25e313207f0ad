"""``certify --skip-bad-images`` and the one-line end of a run that meets an unreadable image on the stream path."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["check_skip_bad_images", "bad_image_exit", "drop_skipped", "skip_record"]


def check_skip_bad_images(args, attacks, world: int) -> None:
    """Refuse ``--skip-bad-images`` where it cannot apply (``SystemExit`` with one line): with --attacks (they need
    the images in memory), --data-path memory (a memory load decodes everything first) or under torchrun."""
    if attacks:
        raise SystemExit("--skip-bad-images reads the images one by one on the stream path; --attacks need them in memory: "
                         "give one of the two (remove the bad files to attack)")
    if args.data_path == "memory":
        raise SystemExit("--skip-bad-images reads the images one by one on the stream path: leave --data-path at auto or stream")
    if world > 1:
        raise SystemExit("--skip-bad-images runs in one process (not under torchrun)")


def _error_text(e: BaseException) -> str:
    """The message of a DatasetError, also when a DataLoader worker re-raised it (its last line is the original)."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        if text.startswith("bagcert.data.DatasetError:"):
            text = text[len("bagcert.data.DatasetError:"):].strip()
    return " ".join(text.split())


@contextlib.contextmanager
def bad_image_exit(args):
    """An image that cannot be read during the certification (the stream path decodes as it goes) ends the run with
    one line naming the file and the way on (``SystemExit``); nothing is written (the report needs every image)."""
    from ..data import DatasetError

    try:
        yield
    except DatasetError as e:
        raise SystemExit(f"{_error_text(e)}; no report was written: remove or replace the file, or rerun with "
                         "--skip-bad-images to certify the other images (the report then lists the skipped files)") from None


def drop_skipped(results: dict, data, record):
    """``(results without the skipped rows, {position: message} of the skipped images)`` after a run over
    :class:`bagcert.streaming.SkipBadImages`; a run where every image was skipped is ``SystemExit``."""
    from ..evaluation import _FIELDS
    from ..certification import CertResult
    from ..streaming import skipped_images

    bad = skipped_images(record)
    if not bad:
        return results, bad
    n = len(data)
    if len(bad) >= n:
        first = next(iter(bad.values()))
        raise SystemExit(f"none of the {n} images could be decoded (the first: {first}); no report was written")
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
