"""Model checkpoints from a run: ``model.pt`` (a peer: ``peer_classifier.pt``) at the end of training, and
:func:`export_checkpoint` from a run's ``last.pt``, both with the same data metadata (:func:`dataset_metadata`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import CheckpointError, safe_torch_load, save_checkpoint
from ..models import create_model
from .config import TrainConfig, _peer_spec

__all__ = ["export_checkpoint", "dataset_metadata"]


def dataset_metadata(train_data) -> dict:
    """Checkpoint metadata from the training set: the seeded split (if one was made) and, for models
    whose classes are Imagenette wnids, the ImageNet-1k index of each label."""
    from ..attacks.imagenet_patch_attack import imagenet_label_mapping

    meta = {}
    if isinstance(train_data.info.get("seeded_split"), dict):
        meta["split"] = dict(train_data.info["seeded_split"])
    applicable, indices, _ = imagenet_label_mapping({}, train_data.classes, len(train_data.classes))
    if applicable and indices is not None:
        meta["imagenet_indices"] = list(indices)
    return meta


def _data_record(train_data, steps_per_epoch: int, data_path: str = "memory") -> dict:
    """What a checkpoint records about its training data: ``dataset`` (name), ``classes``, the seeded ``split``
    and ``imagenet_indices`` where they apply (:func:`dataset_metadata`), ``steps_per_epoch`` and ``data_path``
    (memory or stream). Stored in last.pt so that :func:`export_checkpoint` writes the same metadata keys as the
    model.pt at the end of training, and so that a resume uses the same data path."""
    return {"dataset": train_data.name, "classes": list(train_data.classes), "steps_per_epoch": steps_per_epoch,
            "data_path": data_path, **dataset_metadata(train_data)}


def _data_metadata(record: dict) -> dict:
    """The checkpoint metadata keys of a :func:`_data_record`."""
    return {k: v for k, v in record.items() if k not in ("steps_per_epoch", "data_path")}


def _export_final(cfg, final_model, peer, out, data_record, init_info, run, wall, world, summary) -> None:
    """model.pt (a peer: peer_classifier.pt) at the end of a run, with its metadata."""
    meta = {
        "config": json.loads(json.dumps(asdict(cfg))),
        **_data_metadata(data_record),
        "input_size": cfg.image_size,
        "trained_steps": run.step,
        "epochs": run.epoch,
        "wall_seconds": wall,
        "bagcert_version": __version__,
        "torch_version": str(torch.__version__),
        "world_size": world,
        "eval": summary.get("eval"),
    }
    if cfg.resize is not None:
        meta["resize"] = cfg.resize
    if init_info is not None:
        meta["init_from"] = init_info
    final_model = final_model.to(memory_format=torch.contiguous_format)
    if peer is None:
        final_model.check_inputs = True
        save_checkpoint(out / "model.pt", final_model, **meta)
    else:
        from ..peers import save_peer_classifier

        final_model.backbone.check_inputs = True
        summary["peer_classifier"] = str(save_peer_classifier(out / "peer_classifier.pt", final_model, peer=peer.to_dict(), **meta))


def export_checkpoint(run_dir, path, use_ema: bool = True, **extra_metadata):
    """Write a model checkpoint from a run's ``last.pt`` (e.g. while the run is still going).

    The metadata carries the same data keys as the model.pt written at the end of training (``dataset``,
    ``classes``, and the seeded ``split`` and ``imagenet_indices`` where they apply, see :func:`dataset_metadata`),
    plus that it is an intermediate export and at which step. A ``last.pt`` written before bagcert stored that
    record needs ``dataset=`` and ``classes=`` (and ``split=`` for a folder without splits) in ``extra_metadata``;
    without them it raises :class:`~bagcert.checkpoint.CheckpointError`. Returns the written path.
    """
    run_dir = Path(run_dir)
    state = safe_torch_load(run_dir / "last.pt", "training checkpoint")
    cfg = TrainConfig(**state["config"])
    record = state.get("data")
    if record is None and not {"dataset", "classes"} <= set(extra_metadata):
        raise CheckpointError(
            f"{run_dir / 'last.pt'} carries no record of its training data (written by an older bagcert): pass "
            f"dataset=..., classes=[...] (and split={{...}} for a folder without splits) to export_checkpoint"
        )
    peer = _peer_spec(cfg)
    if peer is None:
        model = create_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_kwargs)
    else:  # a peer run: the export is a peer classifier (bagcert.peers.save_peer_classifier)
        model = peer.build_classifier(cfg.model, cfg.num_classes, **cfg.model_kwargs)
    key = "ema" if use_ema and "ema" in state else "model"
    model.load_state_dict(state[key])
    model.eval()
    meta = {
        "config": state["config"],
        **(_data_metadata(record) if record is not None else {}),
        "input_size": cfg.image_size,
        "trained_steps": int(state["step"]),
        "wall_seconds": float(state.get("wall_seconds", 0.0)),
        "weights": key,
        "intermediate_export": True,
        "bagcert_version": __version__,
        "torch_version": str(torch.__version__),
    }
    if record is not None:
        meta["epochs"] = int(state["step"]) / record["steps_per_epoch"]
    if cfg.resize is not None and cfg.resize >= cfg.image_size:
        meta["resize"] = cfg.resize
    elif cfg.resize is not None:
        # a run from before TrainConfig.check refused it: no loader resizes below the crop, so its images were never
        # resized (a CIFAR-10 layout ignores resize); the export records what was asked and what applied
        meta["ignored_resize"] = cfg.resize
    meta.update(extra_metadata)
    if peer is not None:
        from ..peers import save_peer_classifier

        return save_peer_classifier(path, model, peer=peer.to_dict(), **meta)
    return save_checkpoint(path, model, **meta)
