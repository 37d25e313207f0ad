"""The configuration of a training run: :class:`TrainConfig` and its checks.

:meth:`TrainConfig.check` refuses numbers no run can use; :func:`check_run_inputs` refuses, before anything is
written, data that does not fit the configuration (another image size, other held-out classes, patch sizes larger
than the image); ``_peer_spec`` parses and checks ``cfg.peer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import TrainingError

__all__ = ["TrainConfig", "DATA_PATHS", "check_run_inputs"]


DATA_PATHS = ("auto", "memory", "stream")


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"
    image_size: int = 32
    resize: int | None = None
    num_classes: int = 10
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    eval_images: int = 1000
    flip: bool = True
    pad: int = 4
    cutout: int = 0
    random_crop: bool = False  # train images stored at resize x resize, random image_size crops (ImageNet-style)
    split_seed: int = 0  # seeded train/test split for datasets without one
    test_fraction: float = 0.2
    # model
    model: str = "cifar_bagnet9_s2"
    model_kwargs: dict = field(default_factory=dict)
    # .py files or dotted modules imported before the model is built, so that their bagcert.register_model calls
    # take effect (--model-module; docs/own_model_plugin.md)
    model_modules: list = field(default_factory=list)
    peer: str | None = None  # train a peer's base classifier: "drs-column:4", "drs-block:12", "patchcleanser:5[,k=6,masks=2]"
    # optimisation
    epochs: float = 10.0
    # wall-clock budget in minutes for the whole run: the number of steps is planned from the speed measured
    # during the first steps (see plan_total_steps) and replaces ``epochs``; the plan is written to config.json
    # and kept by --resume
    time_budget_minutes: float | None = None
    batch_size: int = 128  # the global batch of one micro-step, summed over all processes
    grad_accum: int = 1  # micro-batches per optimiser step: each step sees batch_size * grad_accum images
    lr_scale_batch: int | None = None  # linear rule: the peak lr is lr * batch_size * grad_accum / lr_scale_batch
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    ema: float = 0.0  # decay per step (warmed up, see ema_decay); 0 disables
    init_from: str | None = None  # start from this model checkpoint's weights (same model and kwargs) instead of random
    # loss
    loss: str = "bagcert"  # bagcert | ce | masking (bagcert.losses_masking: certified training for double masking)
    masking_evidence: str = "logits"  # logits | votes; masking_clip: the logits' clip; masking_pairs: greedy | all
    masking_clip: float = 1.0
    masking_pairs: str = "greedy"
    masking_scale: float = 10.0  # CE temperature on the evidence normalised into [-1, 1]
    patch_sizes: list = field(default_factory=lambda: [5])
    tau: float = 2.0
    kappa: float = 0.25
    margin_weight: float = 5.0
    margin_warmup_epochs: float = 1.0
    bce_weight: float = 1.0
    bce_pos_weight: float = 1.0
    margin_reduce: str = "min"  # min (the certificate's worst window) | mean (hinge averaged over windows)
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    # system
    amp: bool = False
    channels_last: bool = True
    compile: bool = False
    # under DDP, batch-norm layers normalise with the statistics of the global batch (torch.nn.SyncBatchNorm)
    # instead of each process's share of it; needs CUDA (see check_sync_bn and docs/training.md)
    sync_bn: bool = False
    # torch.compile of the forward pass and the loss together (one graph, its backward compiled with it); the
    # margin weight enters as a tensor so that its warm-up does not recompile (docs/training.md, "On a CPU")
    compile_step: bool = False
    # the optimiser's fused kernel (torch.optim AdamW/Adam fused=True; SGD has none): one kernel per parameter instead
    # of torch's per-parameter loop of small operations on CPU; rounding differs from the unfused update in the last bits
    fused_optimizer: bool = False
    eval_amp: bool = False  # bf16 autocast in the evaluations during training (their numbers move by rounding only)
    device: str = "cpu"
    data_path: str = "auto"  # auto | memory | stream: how train.py reads the training data (bagcert.streaming.choose_data_path)
    workers: int | None = None  # loader processes of the stream path (None: min(8, CPUs))
    seed: int = 0
    threads: int | None = None
    eval_every: float = 1.0  # epochs
    eval_patch_sizes: list = field(default_factory=lambda: [1, 3, 5])
    checkpoint_minutes: float = 5.0
    log_every: int = 20
    output: str = "runs/train"
    tensorboard: bool = True
    progress: bool = True
    max_steps: int | None = None  # stop after this many global steps (tests, benchmarks)

    def check(self) -> "TrainConfig":
        """Refuse numbers no run can use, each with what was expected (from flags or a config file alike).

        Without it, ``batch_size 0`` or ``log_every 0`` ended in a ZeroDivisionError, a negative ``epochs`` or
        ``lr`` trained nothing or uphill, and ``eval_every 0`` was quietly taken as every step. The types are checked
        too (``flip="no"`` would be truthy, ``seed="3"`` failed deep in torch); ``dataset``, ``output`` and
        ``init_from`` may be ``pathlib.Path`` objects and are stored as text (config.json records them).
        """
        self._check_types()
        def number(name, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            is_int = type(v) is int
            ok = is_int if integer else (is_int or type(v) is float) and math.isfinite(v)
            if ok and lo is not None:
                ok = v > lo if lo_open else v >= lo
            if ok and hi is not None:
                ok = v < hi if hi_open else v <= hi
            if not ok:
                kind = "an int" if integer else "a finite number"
                bounds = " and ".join(
                    f"{op} {b:g}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi)) if b is not None)
                raise ValueError(f"{name} must be {kind}{' ' + bounds if bounds else ''}{' (or None)' if optional else ''}, got {v!r}")

        for name in ("image_size", "batch_size", "log_every", "grad_accum"):
            number(name, lo=1, integer=True)
        number("lr_scale_batch", lo=1, integer=True, optional=True)
        number("workers", lo=0, integer=True, optional=True)
        number("num_classes", lo=2, integer=True)
        for name in ("resize", "train_limit"):
            number(name, lo=1, integer=True, optional=True)
        if self.resize is not None and self.resize < self.image_size:
            # the shorter side before the centre crop: a model.pt with resize < input_size cannot be saved (nor read)
            raise ValueError(f"resize must be None or an int >= image_size ({self.image_size}): the shorter image side "
                             f"before the centre {self.image_size}x{self.image_size} crop, got {self.resize!r}")
        number("max_steps", lo=0, integer=True, optional=True)
        for name in ("eval_images", "pad", "cutout"):  # eval_images 0: every held-out image
            number(name, lo=0, integer=True)
        if self.cutout > self.image_size:
            raise ValueError(f"cutout must be at most image_size ({self.image_size}): a {self.cutout}x{self.cutout} square "
                             f"is larger than the {self.image_size}x{self.image_size} training images, got {self.cutout}")
        number("test_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        for name in ("epochs", "lr", "tau", "bce_pos_weight", "eval_every", "masking_clip", "masking_scale"):
            number(name, lo=0, lo_open=True)
        number("time_budget_minutes", lo=0, lo_open=True, optional=True)
        for name in ("weight_decay", "warmup_epochs", "margin_weight", "margin_warmup_epochs", "bce_weight", "ce_weight",
                     "checkpoint_minutes"):
            number(name, lo=0)
        number("kappa")
        for name in ("momentum", "ema", "label_smoothing"):
            number(name, lo=0, hi=1, hi_open=True)
        for name, allowed in (("optimizer", ("adamw", "adam", "sgd")), ("schedule", ("cosine", "onecycle", "constant")),
                              ("loss", ("bagcert", "ce", "masking")), ("margin_reduce", ("min", "mean")), ("data_path", DATA_PATHS),
                              ("masking_evidence", ("logits", "votes")), ("masking_pairs", ("greedy", "all"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.loss != "masking":  # a --masking-* value without --loss masking would be silently unused
            import dataclasses

            unused = [f"{f.name} {getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                      if f.name.startswith("masking_") and getattr(self, f.name) != f.default]
            if unused:
                raise ValueError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} only with loss 'masking', "
                                 f"not {self.loss!r}: give --loss masking (loss='masking') or drop {'it' if len(unused) == 1 else 'them'}")
        if self.loss == "masking" and self.compile_step:
            raise ValueError("compile_step does not support loss 'masking' (its pair search runs outside autograd); drop it")
        from ..models import _is_registered, list_models, load_model_module

        if not isinstance(self.model_modules, list) or not all(isinstance(m, str) and m.strip() for m in self.model_modules):
            raise ValueError(f"model_modules must be a list of .py files or dotted module names, got {self.model_modules!r}")
        for module in self.model_modules:  # imported once per process: a second check is a no-op
            load_model_module(module)
        if not _is_registered(self.model):
            import difflib

            close = difflib.get_close_matches(str(self.model), list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "" if self.model_modules else (
                "; a model of your own is registered by --model-module FILE or an installed plugin "
                "(docs/own_model_plugin.md)")
            raise ValueError(f"model must be a registered model name, got {self.model!r}; available: "
                             f"{', '.join(list_models())}{hint}")
        return self

    _BOOLS = ("flip", "random_crop", "amp", "channels_last", "compile", "sync_bn", "compile_step", "fused_optimizer",
              "eval_amp", "tensorboard", "progress")

    def _check_types(self) -> None:
        """The fields that are not numbers: bools, text, paths, the model's kwargs and the patch-size lists (ValueError
        with one line naming the field); a path given as ``os.PathLike`` is stored as its text."""
        import os

        for name in self._BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("seed", "split_seed"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name, optional in (("dataset", False), ("output", False), ("init_from", True)):
            v = getattr(self, name)
            if v is None and optional:
                continue
            if not isinstance(v, (str, os.PathLike)) or not str(os.fspath(v)).strip():
                raise ValueError(f"{name} must be a path (str or pathlib.Path){' or None' if optional else ''}, got {v!r}")
            setattr(self, name, str(os.fspath(v)))
        for name, optional in (("model", False), ("device", False), ("peer", True)):
            v = getattr(self, name)
            if not (v is None and optional) and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{name} must be non-empty text{' or None' if optional else ''}, got {v!r}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError(f"model_kwargs must be a dict of keyword arguments of the model, such as {{'width': 32}}, "
                             f"got {self.model_kwargs!r}")
        for name in ("patch_sizes", "eval_patch_sizes"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):  # "15" would be read as the sizes 1 and 5
                raise ValueError(f"{name} must be a list of patch sizes such as [5] or [3, '3x7'], got {v!r}")


def _peer_spec(cfg: TrainConfig):
    """The parsed ``cfg.peer`` (None without one); a bad spec, a loss other than CE or an image the spec
    does not fit raise ValueError."""
    if not cfg.peer:
        return None
    from ..peers import PeerSpec

    spec = PeerSpec.parse(cfg.peer)
    if cfg.loss != "ce":
        raise ValueError(
            f"peer {cfg.peer!r}: a peer's base classifier is trained with cross-entropy on its logits; the loss "
            f"{cfg.loss!r} does not apply (set loss='ce'; train.py does so when --loss is not given)"
        )
    spec.check_image_size(cfg.image_size)
    return spec


def _image_hw(data) -> tuple:
    """``(H, W)`` of the images of an in-memory Dataset or a bagcert.streaming dataset."""
    shape = data.image_shape if hasattr(data, "image_shape") else tuple(data.images.shape[1:])
    return int(shape[-2]), int(shape[-1])


def check_run_inputs(cfg: TrainConfig, train_data, eval_data=None, peer=None) -> None:
    """Refuse, before anything is written or trained, the inputs a run could only fail on later or, worse, train
    and score wrongly with. Raises :class:`TrainingError` (one line) when

    * the training images are not ``image_size`` pixels square (``resize`` for in-memory ``random_crop`` data, which
      is cropped per step) or the held-out images are not ``image_size``: the loss and the certificate would use
      windows built for another image size (CIFAR-style folders are never resized);
    * the training data does not have ``num_classes`` classes, or the held-out data's class names differ from the
      training data's (a renamed, missing or extra class folder would shift every held-out label);
    * a training patch size (the bagcert loss) or an evaluation patch size is malformed or larger than the image;
    * the final ``model.pt`` metadata could not be saved (:func:`bagcert.checkpoint.check_metadata`).
    """
    from ..checkpoint import _metadata_problem
    from ..geometry import normalize_patch_sizes
    from ..streaming import StreamDataset

    s = cfg.image_size
    want = cfg.resize if cfg.random_crop and not isinstance(train_data, StreamDataset) else s
    for what, data, expected in (("training", train_data, want), ("held-out", eval_data, s)):
        if data is None:
            continue
        h, w = _image_hw(data)
        if (h, w) != (expected, expected):
            flag = "--resize" if expected != s else "--image-size"
            raise TrainingError(
                f"the {what} images of {data.name} are {h}x{w} pixels but the run is configured for {expected}x{expected} "
                f"({flag} {expected}): the loss and the certificate would use windows built for another image size; give "
                f"{flag} {h if h == w else 'matching the images'} (CIFAR-style folders are not resized; ImageNet-style "
                "folders are resized and centre-cropped to --image-size)")
    if len(train_data.classes) != cfg.num_classes:
        raise TrainingError(f"the training data has {len(train_data.classes)} classes but num_classes is {cfg.num_classes} "
                            f"(--num-classes)")
    if eval_data is not None and list(eval_data.classes) != list(train_data.classes):
        a, b = list(train_data.classes), list(eval_data.classes)
        only_test = [c for c in b if c not in a]
        only_train = [c for c in a if c not in b]
        detail = "; ".join(x for x in (f"only in the held-out data: {only_test}" if only_test else "",
                                         f"only in the training data: {only_train}" if only_train else "") if x)
        raise TrainingError(
            f"the held-out data's classes differ from the training data's ({detail or 'another order'}): every held-out "
            f"label would be scored against another class; the test split needs the training split's class folders "
            f"({len(a)}: {', '.join(map(str, a[:12]))}{' ...' if len(a) > 12 else ''})")
    groups = [("eval_patch_sizes", cfg.eval_patch_sizes)] if peer is None else []
    if peer is None and cfg.loss in ("bagcert", "masking"):
        groups.insert(0, ("patch_sizes", cfg.patch_sizes))
    for name, sizes in groups:
        try:
            parsed = normalize_patch_sizes(list(sizes))
        except (TypeError, ValueError) as e:
            raise TrainingError(f"{name} ({'--' + name.replace('_', '-')}): {e}") from None
        big = [f"{ph}x{pw}" for ph, pw in parsed if ph > s or pw > s]
        if big:
            raise TrainingError(f"{name} (--{name.replace('_', '-')}) {', '.join(big)} larger than the {s}x{s} images; "
                                "patch sizes must fit inside the image")
    problem = _metadata_problem({"input_size": s, "resize": cfg.resize, "classes": [str(c) for c in train_data.classes]},
                                cfg.num_classes, 1)
    if problem:
        raise TrainingError(f"the final model.pt could not be saved with this configuration: {problem}")
