"""Probes of the command line as a new user meets it: help texts and one-line errors."""

import argparse
import re
from pathlib import Path

import pytest
import torch

import bagcert

from bagcert.cli import certify as certify_cli
from bagcert.cli import defensive_patch as defensive_patch_cli
from bagcert.cli import imagenet_a as imagenet_a_cli
from bagcert.cli import roi as roi_cli


def _option_help(parser, option):
    """The --help entry of ``option`` (its line(s) in the options list), whitespace collapsed."""
    action = next(a for a in parser._actions if option in a.option_strings)
    return " ".join(parser._get_formatter()._format_action(action).split())


@pytest.mark.parametrize("module,flags", [
    (certify_cli, ["--no-cache", "--no-progress", "--overwrite", "--quiet"]),
    (imagenet_a_cli, ["--no-cache", "--no-progress"]),
    (roi_cli, ["--no-cache"]),
])
def test_flags_show_no_default_in_help(module, flags):
    """A flag takes no value: its help must not claim a default such as '(default: True)' for --no-cache."""
    parser = module.build_parser()
    for flag in flags:
        assert not re.search(r"\(default: (True|False)\)", _option_help(parser, flag)), flag


@pytest.mark.parametrize("module", [certify_cli, imagenet_a_cli, roi_cli, defensive_patch_cli])
def test_every_option_with_a_default_shows_it(module):
    """Options without help text (roi --steps, --batch-size, ...) still show their default in --help."""
    parser = module.build_parser()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            continue
        assert "default" in _option_help(parser, action.option_strings[-1]), action.option_strings


def test_defensive_patch_refuses_to_evaluate_on_the_images_it_is_made_on(tmp_path):
    """--train-split equal to --eval-split picks the same seeded images for making and evaluating the patch: the
    run is refused before the patch is made, and nothing is written."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "dp"
    with pytest.raises(SystemExit) as exc:
        defensive_patch_cli.main([
            "--checkpoint", str(root / "checkpoints" / "bagcert_cifar10_r5s2_v2.pt"),
            "--dataset", str(root / "samples" / "cifar10"), "--train-split", "test", "--eval-split", "test",
            "--num-train", "4", "--num-eval", "4", "--stage1-epochs", "1", "--stage2-epochs", "1",
            "--corruptions", "none", "--threads", "1", "--quiet", "--output", str(out),
        ])
    message = str(exc.value.code)
    assert "--train-split and --eval-split" in message and "4 of the 4" in message
    assert "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_checkpoint_with_nan_weights_is_a_checkpoint_error_naming_the_tensor(tmp_path):
    """NaN weights used to load and then fail mid-certification with a traceback (NaN local logits)."""
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=3, width=8).eval()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    bagcert.save_checkpoint(path, model, classes=["a", "b", "c"])
    with pytest.raises(bagcert.CheckpointError, match=r"NaN or Inf \(head\.weight\)"):
        bagcert.load_checkpoint(path)
