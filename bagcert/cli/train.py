"""``bagcert train`` (also ``python train.py``): train a BagNet-style model with the certified-robustness loss.

Examples:
    python train.py --dataset ../shared/data/cifar10 --model cifar_bagnet9_s2 --epochs 30 --amp --output runs/c10
    python train.py --config runs/c10/config.json --resume           # continue a killed run exactly
    python train.py --model my_net --model-module my_models.py ...   # a model of your own (docs/own_model_plugin.md)
    torchrun --nproc-per-node 2 train.py --dataset ... --amp          # DDP (gloo on CPU, nccl on CUDA)
    torchrun --nproc-per-node 4 train.py --dataset ... --device cuda --sync-bn   # batch norm over the global batch
    python train.py --dataset ../shared/data/cifar10 --peer drs-column:4 --output runs/drs    # a peer's base classifier
    python train.py --dataset ../shared/data/cifar10 --peer patchcleanser:5 --output runs/pc

--peer SPEC trains the base classifier of a model-agnostic peer defense (docs/peers.md) with
cross-entropy on ablated (de-randomized smoothing) or masked (PatchCleanser) images and writes
<output>/peer_classifier.pt (bagcert.peers.load_peer_certifier) instead of model.pt.

Every option can also come from a JSON config file (``--config``); flags given on the command line
override it. The resolved config is written to ``<output>/config.json``.

This module maps argv to a :class:`bagcert.training.TrainConfig` (:func:`resolve_config`) and prints the result;
the run itself (data loading and checks, then the training loop) is :func:`bagcert.runs.train.train_run`, which a
script can call with a config of its own.

Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes <output>/last.pt and exits with 130 / 143 and
one line; ``--config <output>/config.json --resume`` continues exactly. --resume refuses settings that would
make it another run (model, data, batch size, optimiser, loss, seed, ...), naming them; a new end (--epochs,
--time-budget-minutes, --max-steps) and evaluation/logging/system settings are allowed and logged
(docs/guarantees.md, "Training runs: stop, resume, logs"). An unexpected error mid-run (a loader worker killed, an
image that cannot be decoded) also writes last.pt with the finished steps and ends with one line saying how to
continue. Data of another size than --image-size, test class folders that differ from the training ones and
patch sizes larger than the image are refused before the first step.

--data-path auto|memory|stream (default auto): the in-memory uint8 path while the decoded set fits 25 % of
the available memory, else images decoded per batch by --workers loader processes (bagcert.streaming);
the choice and its reason are printed and logged (a data_path record in train_log.jsonl). ImageNet recipe
options: --grad-accum K, --lr-scale-batch N, --amp (bf16), --channels-last, --compile; multi-node commands
are in docs/imagenet.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..checkpoint import CheckpointError
from ..data import DatasetError
from ..runs.train import RECIPE_DATASET, check_run_values, train_run
from ..training import TrainConfig, TrainingError, _peer_spec, distributed_env
from ._common import Parser, add_model_module_argument, device, import_model_modules, positive_int, workers


def _json_object(text) -> dict:
    """``--model-kwargs``: a JSON object of keyword arguments for the model's constructor."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}); expected an object such as "
                                         '\'{"width": 128}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 128}}', got {text!r}")
    return value


def _parse_list(text):
    out = []
    for t in str(text).split(","):
        t = t.strip()
        if t:
            out.append(int(t) if t.isdigit() else t)
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = Parser(prog=prog, description=__doc__)  # one-line usage errors, no abbreviated options
    p.add_argument("--config", help="JSON config file (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/last.pt if it exists")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="synthetic[:N], a CIFAR-10 folder (torchvision or image folders), or an ImageNet-style folder")
    g.add_argument("--image-size", type=int)
    g.add_argument("--resize", type=int, help="shorter side before the centre crop (ImageNet-style folders)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--train-limit", type=int)
    g.add_argument("--eval-images", type=int, help="held-out images evaluated during training (0: all of them)")
    g.add_argument("--split-seed", type=int, help="seed of the train/test split for datasets without one (default 0)")
    g.add_argument("--test-fraction", type=float, help="test share of that split (default 0.2)")
    g.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet-style: decode training images at --resize x --resize and train on random "
                        "--image-size crops (evaluation uses the centre crop)")
    g.add_argument("--cutout", type=int)
    g.add_argument("--data-path", choices=["auto", "memory", "stream"],
                   help="memory: decode the whole set into one uint8 tensor (the fast path for CIFAR-10, Imagenette); "
                        "stream: decode per batch in --workers loader processes (ImageNet); auto (default): memory while "
                        "the decoded set fits 25%% of the available memory (bagcert.streaming.choose_data_path)")
    g.add_argument("--workers", type=workers, help="loader processes of the stream path (default min(8, CPUs); at most "
                   "what the CPU cores and memory allow, bagcert.streaming.max_loader_workers); refused with --data-path memory")
    g.add_argument("--pad", type=int)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="a registered model name (bagcert.list_models()), or one that --model-module or an "
                   "installed plugin registers")
    add_model_module_argument(g, "recorded in config.json")
    g.add_argument("--model-kwargs", type=_json_object, help='JSON, e.g. \'{"width": 128, "receptive_field": 9}\'')
    g.add_argument("--peer", help="train the base classifier of a peer defense instead of a bagcert model: drs-column:B, "
                   "drs-block:B [,encoding=mask|levine_feizi|fill] (de-randomized smoothing, band B) or patchcleanser:P "
                   "[,k=6,masks=2,fill=0.5] (mask set for PxP patches); --model is its backbone, the loss cross-entropy")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float)
    g.add_argument("--time-budget-minutes", type=float,
                   help="wall-clock budget for the whole run: measure the speed during the first steps and replace "
                        "--epochs by what fits (written to <output>/config.json; --resume keeps the plan)")
    g.add_argument("--batch-size", type=int, help="global batch of one micro-step, summed over all processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimiser step (default 1): a step sees "
                   "batch-size x grad-accum images; under DDP gradients are all-reduced once per step")
    g.add_argument("--lr-scale-batch", type=int, help="linear learning-rate rule: the peak lr is --lr x batch-size x "
                   "grad-accum / N (N: the batch --lr was tuned for, e.g. 256); logged as an lr_rule record")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["cosine", "onecycle", "constant"])
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--ema", type=float, help="EMA decay per step (0 disables)")
    g.add_argument("--init-from", help="start from this model checkpoint's weights (same model and kwargs), e.g. to "
                   "continue a finished run with a new schedule, or from the public BagNet ImageNet weights in the original "
                   "layout for bagnet9/17/33 (e.g. bagnet16-105524de.pth.tar: docs/imagenet.md); --resume takes precedence "
                   "once the run has a last.pt")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["bagcert", "ce", "masking"],
                   help="masking: certified training for double masking on the local map (bagcert.losses_masking)")
    g.add_argument("--masking-evidence", choices=["logits", "votes"], help="--loss masking: clipped logits or votes")
    g.add_argument("--masking-clip", type=float, help="--loss masking: logits clipped to (-clip, clip)")
    g.add_argument("--masking-pairs", choices=["greedy", "all"],
                   help="--loss masking: worst pair by greedy search (2M windows) or over all M^2 pairs")
    g.add_argument("--masking-scale", type=float, help="--loss masking: CE temperature on the evidence normalised to [-1, 1]")
    g.add_argument("--patch-sizes", type=_parse_list, help="training patch sizes, e.g. 5 or 3,5")
    g.add_argument("--tau", type=float)
    g.add_argument("--kappa", type=float)
    g.add_argument("--margin-weight", type=float)
    g.add_argument("--margin-warmup-epochs", type=float)
    g.add_argument("--bce-weight", type=float)
    g.add_argument("--ce-weight", type=float)
    g.add_argument("--bce-pos-weight", type=float, help="weight of the true-class BCE term (lowers the vote threshold)")
    g.add_argument("--margin-reduce", choices=["min", "mean"], help="hinge the worst window (min) or every window (mean)")
    g.add_argument("--label-smoothing", type=float)
    g = p.add_argument_group("system")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CPU with AMX, CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward pass and the loss together (one graph with its backward)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused AdamW/Adam kernel (rounding differs in the last bits)")
    g.add_argument("--eval-amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in the evaluations during training")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="torchrun on GPUs: batch-norm layers use the statistics of the global batch (torch.nn.SyncBatchNorm) "
                        "instead of each process's share, so N processes train what one process would; refused on CPU "
                        "(docs/training.md, \"Batch norm under DDP\")")
    g.add_argument("--device", type=device, help="cpu, cuda, cuda:N or mps (refused when this machine has none)")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--eval-every", type=float, help="epochs between evaluations")
    g.add_argument("--eval-patch-sizes", type=_parse_list)
    g.add_argument("--checkpoint-minutes", type=float)
    g.add_argument("--max-steps", type=positive_int, help="stop after this many optimiser steps (>= 1)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--output")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    _show_defaults(p)
    return p


#: The defaults of ``train.py`` / ``bagcert train``: the recipe of the shipped bagcert-cifar10-r5 (v2) model
#: (docs/model_card.md; it trained for 91.5 epochs in a 140-minute --time-budget-minutes run on 2 CPU cores).
#: A config file overrides them and flags override both; the library's TrainConfig keeps its own neutral defaults.
RECIPE = {
    "dataset": RECIPE_DATASET,  # where it does not exist: the bundled samples (bagcert.runs.train.resolve_dataset)
    "model": "cifar_bagnet5_s2",
    "model_kwargs": {"width": 128},
    "epochs": 92.0,
    "lr": 2e-3,
    "margin_reduce": "mean",
    "bce_pos_weight": 3.0,
    "ema": 0.999,
    "amp": True,
    "eval_every": 2.0,
    "eval_images": 1000,
    "checkpoint_minutes": 4.0,
}


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise SystemExit(f"--config {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a JSON object of TrainConfig keys, got {type(data).__name__}")
    return data


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Append each option's default (the recipe's, else TrainConfig's) to its help, so --help shows every default."""
    base = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in p._actions:
        if action.dest in fields:
            value = RECIPE.get(action.dest, getattr(base, action.dest))
            shown = json.dumps(value) if isinstance(value, (dict, list)) else value
            if action.dest == "dataset":
                shown = (f"{value} when that folder exists, else the 200 CIFAR-10 test images bundled with bagcert, "
                         "split 80/20 by a seeded split: a smoke test, not a training set")
            text = (action.help or "").rstrip()
            action.help = (text + " " if text else "") + f"(default: {shown})".replace("%", "%%")


def resolve_config(args) -> TrainConfig:
    """TrainConfig from :data:`RECIPE`, then the ``--config`` file, then the flags (each overriding the one before)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPE.items()}
    if args.config:
        values.update(_read_json(args.config))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - fields
    if unknown:
        raise SystemExit(f"config file {args.config} has unknown keys {sorted(unknown)}")
    for name in fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if values["model"] != RECIPE["model"] and values["model_kwargs"] == RECIPE["model_kwargs"] and not (
            getattr(args, "model_kwargs", None) is not None or (args.config and "model_kwargs" in _read_json(args.config))):
        values["model_kwargs"] = {}  # the recipe's width belongs to the recipe's model
    if values.get("peer"):
        # a peer's base classifier is a plain classifier: cross-entropy on its logits
        if "loss" not in values:
            values["loss"] = "ce"
        elif values["loss"] != "ce":
            raise SystemExit(
                f"--peer {values['peer']} trains a base classifier with cross-entropy: --loss {values['loss']} "
                "(from the command line or the config file) does not apply; give --loss ce"
            )
    import_model_modules(values.get("model_modules"))
    cfg = TrainConfig(**values)
    try:
        cfg.check()
        check_run_values(cfg)  # the device exists here, the loader processes fit, max_steps >= 1
    except ValueError as e:
        name = str(e).split()[0]
        flag = f"--{name.replace('_', '-')}"
        where = f"{flag} or {name!r}" if flag in build_parser()._option_string_actions else repr(name)  # flip: no flag
        raise SystemExit(f"{e} ({where} in the config file)") from None
    try:
        _peer_spec(cfg)
    except ValueError as e:
        raise SystemExit(f"--peer: {e}") from None
    return cfg


def main(argv=None, prog: str | None = None) -> int:
    """Run ``bagcert train`` / ``train.py``; returns the exit status (0, or 128 + signal number after a SIGINT/SIGTERM stop).

    A user mistake (a bad number, an unknown model, an unwritable --output, a dataset or checkpoint that cannot be
    read, a --resume with other settings, a time budget too small) raises SystemExit with one line.
    """
    from ..training import leave_process_group

    try:
        rc = _main(argv, prog)
    except (DatasetError, CheckpointError, TrainingError) as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C before training started (train() itself turns it into a graceful stop)
        print("interrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    leave_process_group()
    return rc


def _main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = resolve_config(args)
    summary = train_run(cfg, resume=args.resume)  # data loading, checks and the loop: bagcert.runs.train
    rank = distributed_env()[0]
    if summary.get("stopped"):
        if rank == 0:
            print(f"stopped by {summary['stopped']} after step {summary['steps']}: {summary['output']}/last.pt written; "
                  f"continue with: train.py --config {summary['output']}/config.json --resume", file=sys.stderr)
        return summary["exit_status"]
    if rank == 0:
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
