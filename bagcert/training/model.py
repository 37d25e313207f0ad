"""The model a run trains: built from the config (a bagcert model or a peer's classifier), optionally started from
a checkpoint's weights (``init_from``: a bagcert checkpoint or the original BagNet ImageNet weights)."""

from __future__ import annotations

import json

import torch

from ..models import create_model
from .config import TrainConfig
from .errors import TrainingError


def _build_model(cfg: TrainConfig, peer, device):
    """(model, init_from record or None), on ``device``, channels_last if configured; seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)  # model initialisation only; data randomness uses its own generators
    if peer is None:
        model = create_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_kwargs).to(device)
        model.check_inputs = False  # inputs come from our own uint8 pipeline
        init_info = _init_from_checkpoint(model, cfg.init_from) if cfg.init_from else None
        _check_geometry(model, cfg)
    else:
        from ..peers import init_peer_classifier

        model = peer.build_classifier(cfg.model, cfg.num_classes, **cfg.model_kwargs).to(device)
        model.backbone.check_inputs = False
        init_info = init_peer_classifier(model, cfg.init_from) if cfg.init_from else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, init_info


def _check_geometry(model, cfg: TrainConfig) -> None:
    """Refuse, before the first step, a model whose declared geometry does not cover its true receptive field on
    ``cfg.image_size`` images (:func:`bagcert.verify_geometry`): the loss and every evaluation during training use
    the declared geometry, so a wrong one would train and report certificates a patch can break. Registry models
    built by their own constructor pass at once. Raises TrainingError."""
    from ..geometry_inference import GeometryError, verify_geometry

    was_training = model.training
    model.eval()  # BatchNorm in training mode (batch statistics) cannot be traced
    try:
        verify_geometry(model, (cfg.image_size, cfg.image_size))
    except GeometryError as e:
        raise TrainingError(f"--model {cfg.model}: {e}") from None
    finally:
        model.train(was_training)


def _init_from_checkpoint(model, path) -> dict:
    """Load a model checkpoint's weights into ``model`` (a warm start, e.g. to continue a finished run with a
    new schedule): a bagcert checkpoint of the same architecture (``dense`` may differ: a strided model
    fine-tuned as its dense evaluation, see :class:`bagcert.models.CifarBagNet`), or the public BagNet-9/17/33 ImageNet
    weights in the original repository's state-dict layout (Brendel & Bethge, ICLR 2019) for ``bagnet9/17/33``,
    converted by :func:`bagcert.models.convert.load_bagnet_state_dict` (the 1000-class head is loaded only when
    the class count matches). Returns what is known about the source. Raises CheckpointError / TrainingError."""
    from ..checkpoint import FORMAT, CheckpointError, load_checkpoint
    from ..models import BagNet
    from ..models.convert import load_bagnet_state_dict, read_weights_file

    try:
        obj = read_weights_file(path)  # weights-only; a refused or unreadable file is a CheckpointError
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from e
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        if not isinstance(model, BagNet):
            raise TrainingError(
                f"--init-from {path}: not a bagcert checkpoint; weights in the original BagNet layout load only into "
                f"bagnet9/bagnet17/bagnet33, not {model.config['name']}"
            )
        report = load_bagnet_state_dict(obj, model, name=str(path))
        return {"path": str(path), "source": "bagnet-original",
                **{k: report[k] for k in ("source_receptive_field", "loaded", "skipped", "skip_reason", "summary")}}
    src, src_meta = load_checkpoint(path)
    if _weights_config(src) != _weights_config(model):
        raise TrainingError(
            f"--init-from {path}: its model {src.config['name']} {src.config['kwargs']} differs from the configured "
            f"{model.config['name']} {model.config['kwargs']} (only \"dense\" may differ)"
        )
    model.load_state_dict(src.state_dict())
    return {
        "path": str(path),
        "trained_steps": src_meta.get("trained_steps"),
        "epochs": src_meta.get("epochs"),
        "wall_seconds": src_meta.get("wall_seconds"),
        "dense": bool(src.config["kwargs"].get("dense", False)),
    }


def _weights_config(model) -> dict:
    """A model's config without its ``dense`` switch and with its class count: a strided network and its dense
    (a trous) evaluation share every weight, so either initialises the other."""
    kwargs = {k: v for k, v in model.config["kwargs"].items() if k != "dense"}
    kwargs["num_classes"] = model.num_classes
    # a checkpoint stores tuples (mean, std) as lists: compare the JSON forms
    return json.loads(json.dumps({"name": model.config["name"], "kwargs": kwargs}, sort_keys=True))


class _LocalLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.local_logits(x)
