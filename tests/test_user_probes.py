"""Probes of the command line as a new user meets it: help texts and one-line errors."""

import re

import pytest

from bagcert.cli import certify as certify_cli
from bagcert.cli import imagenet_a as imagenet_a_cli
from bagcert.cli import roi as roi_cli


def _option_help(parser, option):
    """The help text of ``option`` in ``parser.format_help()``, whitespace collapsed."""
    text = " ".join(parser.format_help().split())
    match = re.search(re.escape(option) + r"\s(.*?)(?= --[a-z]|$)", text)
    assert match, option
    return match.group(1)


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
