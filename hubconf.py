"""torch.hub entry points for bagcert's shipped models.

Load a shipped model from a checkout (nothing is downloaded; the weights are the files in ``checkpoints/``
next to this file, found by name through :mod:`bagcert.shipped`)::

    import torch, bagcert
    model = torch.hub.load("/path/to/bagcert", "bagcert_cifar10", source="local")
    res = bagcert.certify(model, images, labels, patch_size=5)

Each entry point returns a :class:`bagcert.BagModel` in eval mode, ready for ``bagcert.certify``. The
checkpoint's metadata (classes, input size, training config, evaluation) is attached as ``model.metadata``
(a dict). Images are float [B, 3, H, W] in [0, 1]; normalisation is inside the model.
"""

dependencies = ["torch", "torchvision", "numpy", "tqdm"]


def _load(name):
    import bagcert
    from bagcert.shipped import resolve_checkpoint

    model, metadata = bagcert.load_checkpoint(resolve_checkpoint(name))
    model.metadata = metadata
    return model.eval()


def bagcert_cifar10(pretrained=True):
    """bagcert-cifar10-r5-dm: the shipped CIFAR-10 model, ``checkpoints/bagcert_cifar10_r5s2_dm.pt``.

    10 CIFAR-10 classes (``model.metadata["classes"]``: airplane, automobile, ..., truck); input float
    [B, 3, 32, 32] in [0, 1]. ``cifar_bagnet5_s2`` (receptive field 5, width 128) trained for the vote count
    (bagcert-cifar10-r5 v2), fine-tuned for double masking (``--loss masking``) and evaluated densely
    (``dense=True``: 32 x 32 locations, stride 1), votes aggregation. On the full CIFAR-10 (JPEG q75 copy) test set:
    66.42 % clean, 44.29 % certified against 5x5 patches by double masking of its local logits clipped to
    (-1, 1) (``bagcert.peers.LocalDoubleMasking("logits")``, the default certificate of ``bagcert certify`` for this
    model); 65.41 % clean, 27.25 % certified by the vote count (``bagcert.certify``; docs/model_card.md).

    Args:
        pretrained: must be True; only the shipped weights are offered.

    Returns:
        bagcert.BagModel in eval mode, with ``model.metadata`` (dict).

    Raises:
        ValueError: ``pretrained`` is not True.
        bagcert.CheckpointError: the checkpoint file is missing or damaged.
    """
    _check_pretrained(pretrained)
    return _load("bagcert-cifar10-r5-dm")


def bagcert_imagenette(pretrained=True):
    """bagcert-imagenette-r17: the shipped Imagenette model, ``checkpoints/bagcert_imagenette_r17s8.pt``.

    10 Imagenette classes (``model.metadata["classes"]``: wnids; ``model.metadata["imagenet_indices"]``: their
    ImageNet-1k indices); input float [B, 3, 128, 128] in [0, 1] (resize the shorter side to 146, centre-crop
    128; ImageNet normalisation is inside the model). ``image_bagnet17_s8`` (receptive field 17, stride 8,
    16 x 16 locations), votes aggregation. On its 685 held-out Imagenette images: 73.14 % clean, 39.12 %
    certified against 2 % (18x18) patches (docs/model_card_imagenette.md).

    Args:
        pretrained: must be True; only the shipped weights are offered.

    Returns:
        bagcert.BagModel in eval mode, with ``model.metadata`` (dict).

    Raises:
        ValueError: ``pretrained`` is not True.
        bagcert.CheckpointError: the checkpoint file is missing or damaged.
    """
    _check_pretrained(pretrained)
    return _load("bagcert-imagenette-r17")


def _check_pretrained(pretrained):
    if pretrained is not True:
        raise ValueError(
            f"pretrained={pretrained!r}: bagcert's hub entry points offer only the shipped weights "
            "(pretrained=True); build an untrained model with bagcert.create_model(name, num_classes=...)"
        )
