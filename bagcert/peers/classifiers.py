"""Base classifiers for the model-agnostic peers (de-randomized smoothing, PatchCleanser).

:class:`PooledClassifier` turns a registry backbone into a plain classifier ``x -> logits [B, C]``
(the mean of its local logits, the classic BagNet pooled logits). With ``in_channels != 3`` its first
convolution reads that many channels, so it can take the 6-channel ablation encodings of
de-randomized smoothing (:func:`ablation_classifier`); those inputs are fed as they are (already in
[0, 1]; there is no colour mean/std for a keep mask).

Checkpoints: :func:`save_peer_classifier` / :func:`load_peer_classifier` write and read a plain dict
of tensors and builtins (format ``bagcert-peer-classifier``), loaded with ``weights_only=True`` and
``strict=True`` like :mod:`bagcert.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, _plain, atomic_torch_save, safe_torch_load
from ..models import InputError, create_model
from .smoothing import AblatedInput

__all__ = ["PooledClassifier", "ablation_classifier", "save_peer_classifier", "load_peer_classifier", "init_peer_classifier"]

FORMAT = "bagcert-peer-classifier"
FORMAT_VERSION = 1


def _widen_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            parent = model
            *path, last = name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, last, new)
            return
    raise ValueError("the backbone has no 3-channel input convolution to widen")


class PooledClassifier(nn.Module):
    """A registry backbone as a plain classifier: ``forward(x) = mean of local logits`` [B, C].

    Args:
        backbone: registry name (``bagcert.list_models()``).
        num_classes: number of classes.
        in_channels: 3 for [0, 1] RGB images (normalised inside the backbone); anything else widens
            the first convolution and feeds the input unnormalised.
        **model_kwargs: passed to ``bagcert.create_model`` (e.g. ``width=32``).
    """

    def __init__(self, backbone: str = "cifar_bagnet9_s2", num_classes: int = 10, in_channels: int = 3, **model_kwargs):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.backbone = create_model(backbone, num_classes=num_classes, **model_kwargs)
        self.num_classes = num_classes
        self.in_channels = in_channels
        if in_channels != 3:
            _widen_first_conv(self.backbone, in_channels)
        self.config = {"backbone": backbone, "num_classes": num_classes, "in_channels": in_channels, "model_kwargs": dict(model_kwargs)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 3:
            return self.backbone.mean_logits(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"expected inputs [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        return self.backbone.features_to_logits(x).mean(dim=(2, 3))


def ablation_classifier(backbone: str = "cifar_bagnet9_s2", num_classes: int = 10, encoding="mask", **model_kwargs) -> PooledClassifier:
    """A base classifier for :class:`~bagcert.peers.DerandomizedSmoothing` that reads ``encoding``."""
    enc = encoding if isinstance(encoding, AblatedInput) else AblatedInput(encoding)
    return PooledClassifier(backbone, num_classes, in_channels=enc.channels, **model_kwargs)


def save_peer_classifier(path, classifier: PooledClassifier, **metadata) -> Path:
    """Save a :class:`PooledClassifier` (architecture + weights + builtin metadata) atomically."""
    if not isinstance(classifier, PooledClassifier):
        raise TypeError(f"expected a PooledClassifier, got {type(classifier).__name__}")
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _plain(classifier.config, "config"),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
        "metadata": _plain(metadata, "metadata"),
    }
    atomic_torch_save(obj, path)
    return Path(path)


def load_peer_classifier(path):
    """Load a peer classifier safely: ``(classifier, metadata)``, the classifier in eval mode."""
    obj = safe_torch_load(path, "peer classifier")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bagcert peer classifier (no 'format': '{FORMAT}' entry)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {obj.get('format_version')!r}; expected {FORMAT_VERSION}")
    cfg = obj.get("config") or {}
    try:
        clf = PooledClassifier(cfg["backbone"], cfg["num_classes"], cfg["in_channels"], **cfg.get("model_kwargs", {}))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the classifier: {e}") from None
    try:
        clf.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture: {str(e)[:500]}") from None
    return clf.eval(), obj.get("metadata", {})


def init_peer_classifier(classifier: PooledClassifier, path) -> dict:
    """Load the weights of ``path`` into ``classifier`` (a warm start, ``train.py --peer ... --init-from``).

    ``path`` is either a peer classifier (the same architecture) or, for a 3-channel classifier, a bagcert
    model checkpoint of the same backbone (e.g. fine-tune a trained bagcert model with PatchCleanser
    masks). A bagcert checkpoint cannot start a 6-channel classifier. Returns what the source's
    metadata records (path, trained steps, epochs, wall time).
    """
    from ..checkpoint import load_checkpoint

    obj = safe_torch_load(path, "checkpoint")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        src, meta = load_peer_classifier(path)
        if src.config != classifier.config:
            raise ValueError(f"--init-from {path}: its peer classifier {src.config} differs from the configured {classifier.config}")
        classifier.load_state_dict(src.state_dict())
    else:
        if classifier.in_channels != 3:
            raise ValueError(
                f"--init-from {path}: a bagcert model checkpoint has a 3-channel input, the classifier reads "
                f"{classifier.in_channels} channels; start from a peer classifier of the same spec instead"
            )
        src, meta = load_checkpoint(path)
        if src.config != classifier.backbone.config:
            raise ValueError(
                f"--init-from {path}: its model {src.config['name']} {src.config['kwargs']} differs from the configured "
                f"{classifier.backbone.config['name']} {classifier.backbone.config['kwargs']}"
            )
        classifier.backbone.load_state_dict(src.state_dict())
    return {k: meta.get(k) for k in ("trained_steps", "epochs", "wall_seconds")} | {"path": str(path)}
