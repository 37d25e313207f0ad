"""Every ```python block of README.md and docs/getting_started.md runs exactly as pasted.

Each block runs in a fresh namespace, in a temporary working directory, with one torch thread. Relative
repository paths in string literals ("checkpoints/...", "samples/...", "docs/...", and "." for the repository
root) are resolved against the checkout, as if the block were pasted in the repository root.
"""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/getting_started.md", "docs/own_model.md"]
REPO_PATHS = ("checkpoints/", "samples/", "docs/")
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def python_blocks(text):
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return _BLOCK.findall(text)


def resolve_repo_paths(code):
    """Rewrite string literals that start with a repository folder into absolute paths in this checkout."""
    for quote in ('"', "'"):
        for prefix in REPO_PATHS:
            code = code.replace(quote + prefix, quote + (REPO / prefix).as_posix() + "/")
        code = code.replace(quote + "." + quote, quote + REPO.as_posix() + quote)
    return code


def _cases():
    for doc in DOCS:
        for i, block in enumerate(python_blocks((REPO / doc).read_text(encoding="utf-8"))):
            yield pytest.param(doc, block, id=f"{doc}-block{i}")


def test_extractor_finds_the_tour_and_resolves_paths():
    blocks = python_blocks("text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 'samples/x'\n```\n")
    assert blocks == ["a = 1\n", "b = 'samples/x'\n"]
    assert resolve_repo_paths(blocks[1]) == f"b = '{(REPO / 'samples').as_posix()}/x'\n"
    assert resolve_repo_paths('load(".", "m")') == f'load("{REPO.as_posix()}", "m")'
    readme = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert any("bagcert.certify(" in block for block in readme)


@pytest.mark.parametrize("doc, block", list(_cases()))
def test_doc_python_block_runs_as_pasted(doc, block, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(resolve_repo_paths(block), f"<{doc}>", "exec"), {"__name__": "__doc_block__"})
    assert os.getcwd() == str(tmp_path)
