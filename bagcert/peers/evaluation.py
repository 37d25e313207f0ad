"""Certify a whole dataset with a peer certifier (the batch loop of ``bagcert.evaluation``)."""

from __future__ import annotations

import time

import torch

from ..evaluation import certify_batches, check_patch_sizes
from ..geometry_inference import verify_geometry
from .base import make_result
from .patchcleanser import PatchCleanser, double_masking_from_pairs
from .local_masking import LocalDoubleMasking
from .patchguard import PatchGuardMasking
from .smoothing import affected_ablations, certify_counts

__all__ = ["certify_peer_dataset"]


@torch.no_grad()
def certify_peer_dataset(cert, classifier, data, patch_sizes, *, mask_set=None, batch_size: int = 250, device="cpu",
                         progress: bool = False, rank: int = 0, world: int = 1):
    """``bagcert.evaluation.certify_dataset`` for a peer certifier (de-randomized smoothing, PatchCleanser or
    PatchGuard robust masking or local double masking of a bagcert model):
    the same batches, the same sharding over ranks and the same ``(results, timing)``.

    The network evaluations of a batch are made once for all patch sizes and timed as ``forward_s``: the
    ablation votes (de-randomized smoothing: each size only changes Δ) or the two-mask prediction table of
    ``mask_set`` (PatchCleanser: one mask set for every size, each at most its patch, so the certificate is
    the same for all of them), or the evidence map (PatchGuard: one pass of the model, every size masks its
    own window; :class:`LocalDoubleMasking`: one pass, each size its own mask set unless the certifier fixes one
    with ``mask_patch_size``). ``certify_s`` times the certificates computed from them, with the
    certifier's own rules (``certify_counts``; ``double_masking_from_pairs`` and the all-pairs check), so
    the results equal ``cert.certify(classifier, x, y, size)`` (PatchCleanser: with ``mask_set``'s patch).
    """
    if classifier.training:
        raise RuntimeError("classifier is in training mode; call .eval() before certifying")
    H, W = data.images.shape[-2:]
    keys, sizes = check_patch_sizes(patch_sizes, (H, W))
    pc = isinstance(cert, PatchCleanser)
    pg = isinstance(cert, (PatchGuardMasking, LocalDoubleMasking))
    if pg:  # the bag model's declared geometry, checked once per (model, image size); registry models are trusted
        geometry = verify_geometry(classifier, (H, W))
    if pc:
        if mask_set is None:
            raise ValueError("PatchCleanser needs the mask set to certify with")
        big = [k for k, (ph, pw) in zip(keys, sizes) if ph > mask_set.patch_size[0] or pw > mask_set.patch_size[1]]
        if big:
            raise ValueError(f"patch sizes {big} are larger than the {mask_set.patch_size} patch the mask set covers")
    elif not pg:
        deltas = [affected_ablations((H, W), s, cert.band_size, cert.mode) for s in sizes]

    def certify_batch(x, y):
        t = time.perf_counter()
        if pg:
            evidence = cert.evidence(classifier, x)  # [B, C, h, w], one forward pass
            C = evidence.shape[1]
        elif pc:
            table, C = cert.two_mask_predictions(classifier, x, mask_set)  # F(x ⊙ r ⊙ r') for every pair of masks
        else:
            votes, C = cert.votes(classifier, x, return_num_classes=True)  # the class of every ablation
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        if y.numel() and int(y.max()) >= C:
            raise ValueError(f"labels must lie in [0, {C})")
        if pg:
            res = {k: cert.certify_evidence(evidence, y, geometry.for_map((H, W), evidence.shape[-2:]), (H, W), s) for k, s in zip(keys, sizes)}
        elif pc:
            pred = double_masking_from_pairs(table, C)
            M = table.shape[1]
            iu = torch.triu_indices(M, M, device=table.device)
            wrong = (table[:, iu[0], iu[1]] != pred[:, None]).sum(dim=1)  # unordered pairs that disagree with pred
            res = {k: make_result(pred, y, wrong == 0, 1 - wrong, s, cert.name) for k, s in zip(keys, sizes)}
        else:
            counts = cert.counts(votes, C)
            res = {}
            for k, s, delta in zip(keys, sizes, deltas):
                pred, certified, margin = certify_counts(counts, delta)
                res[k] = make_result(pred, y, certified, margin, s, cert.name)
        return res, t_fwd, time.perf_counter() - t

    return certify_batches(data, keys, certify_batch, batch_size=batch_size, device=device, progress=progress,
                           desc=f"certify {cert.name}", rank=rank, world=world)
