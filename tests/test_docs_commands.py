"""Documented commands name only flags their parser has, so the docs cannot rot silently.

Every command line in a fenced code block of README.md and docs/*.md (backslash continuations joined), and every
inline code span, that runs a bagcert tool (`bagcert <command>`, `python certify.py`, `python train.py`,
`python -m bagcert[.cli.<tool>]`, also after `.venv/bin/` or `torchrun ...`) is parsed: each `--flag` it passes
to the tool must be an option string of that tool's `build_parser()` in bagcert/cli/.
"""

import re
import shlex
from pathlib import Path

import pytest

from bagcert.cli import certify, defensive_patch, imagenet_a, models, roi, train

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: tool name -> module with build_parser()
TOOLS = {
    "certify": certify,
    "train": train,
    "imagenet-a": imagenet_a,
    "defensive-patch": defensive_patch,
    "roi": roi,
    "models": models,
}
_MODULE_TOOL = {"bagcert.cli." + m.__name__.rsplit(".", 1)[1]: name for name, m in TOOLS.items()}
_SCRIPT_TOOL = {"certify.py": "certify", "train.py": "train"}
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`\n]+)`")
_STOP = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def command_lines(text):
    """Shell lines of the fenced blocks (continuations joined) and the inline code spans outside them."""
    lines = []
    for block in _FENCE.findall(text):
        buf = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            lines.append(buf + line)
            buf = ""
        if buf:
            lines.append(buf)
    lines += _SPAN.findall(_FENCE.sub("", text))
    return lines


def tool_invocations(line):
    """(tool, [flags]) for each bagcert tool the line runs; flags are the `--name` parts before '=' ."""
    line = line.split(" #")[0]
    try:
        words = shlex.split(line)
    except ValueError:  # an unbalanced quote in prose, not a command
        return []
    found = []
    i = 0
    while i < len(words):
        w, tool, start = words[i], None, None
        base = w.rsplit("/", 1)[-1]
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if base == "bagcert" and nxt in TOOLS:
            tool, start = nxt, i + 2
        elif base in _SCRIPT_TOOL and (i == 0 or any(v.rsplit("/", 1)[-1].startswith(("python", "torchrun")) for v in words[:i])):
            tool, start = _SCRIPT_TOOL[base], i + 1  # python train.py, torchrun --nproc-per-node 2 train.py
        elif w == "-m" and nxt in _MODULE_TOOL:
            tool, start = _MODULE_TOOL[nxt], i + 2
        elif w == "-m" and nxt == "bagcert" and i + 2 < len(words) and words[i + 2] in TOOLS:
            tool, start = words[i + 2], i + 3
        if tool is None:
            i += 1
            continue
        flags = []
        j = start
        while j < len(words) and words[j] not in _STOP:
            if words[j].startswith("--") and len(words[j]) > 2:
                flags.append(words[j].split("=", 1)[0])
            j += 1
        found.append((tool, flags))
        i = j
    return found


def _parser_options(tool):
    return set(TOOLS[tool].build_parser()._option_string_actions)


def documented_commands():
    for doc in DOCS:
        for line in command_lines(doc.read_text(encoding="utf-8")):
            for tool, flags in tool_invocations(line):
                yield doc.relative_to(REPO).as_posix(), line.strip(), tool, flags


def test_the_extractor_reads_blocks_continuations_spans_and_torchrun():
    text = ("Run `bagcert certify --dense`.\n```bash\n.venv/bin/python train.py --epochs 1 \\\n    --amp  # comment --x\n"
            "torchrun --nproc-per-node 2 certify.py --workers 1 | tee log\npython -m bagcert.cli.roi --qs 1,2\n```\n")
    got = [inv for line in command_lines(text) for inv in tool_invocations(line)]
    assert ("train", ["--epochs", "--amp"]) in got
    assert ("certify", ["--workers"]) in got
    assert ("roi", ["--qs"]) in got
    assert ("certify", ["--dense"]) in got
    assert tool_invocations("python other.py --epochs 1") == []


def test_a_misspelt_flag_is_caught():
    (tool, flags), = tool_invocations("python certify.py --patch-size 5")
    assert "--patch-size" not in _parser_options(tool)


def test_the_docs_document_commands_of_every_main_tool():
    tools = {tool for _, _, tool, _ in documented_commands()}
    assert {"certify", "train", "imagenet-a", "defensive-patch", "roi"} <= tools


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_documented_flag_exists_in_the_tools_parser(tool):
    options = _parser_options(tool)
    bad = [f"{doc}: {flag} in: {line}" for doc, line, t, flags in documented_commands() if t == tool
           for flag in flags if flag not in options]
    assert not bad, "flags the parser does not have:\n" + "\n".join(bad)
