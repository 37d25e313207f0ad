"""The manual stays connected and short: every relative link of README.md and docs/ (experiments included) points
at a file that exists, every `#anchor` at a heading of its page, and the manual (README.md and docs/*.md; not the dated docs/experiments/ entries, which
are history) stays under 20,000 words."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs" / "experiments").glob("*.md"))]
MANUAL_WORD_LIMIT = 20_000
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    found, seen = set(), {}
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path):
    for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        yield target


def test_slug_follows_github():
    assert slug("bagcert-cifar10-r5 (v2): the same weights at stride 2") == "bagcert-cifar10-r5-v2-the-same-weights-at-stride-2"
    assert slug("`bagcert certify` options") == "bagcert-certify-options"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


def test_the_manual_stays_under_its_word_limit():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    words = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").split()) for p in pages}
    assert sum(words.values()) < MANUAL_WORD_LIMIT, words
