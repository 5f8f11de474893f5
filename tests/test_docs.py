"""The README is a front page and the docs/ pages hold the rest: every relative link in them points to
a file (and heading) that exists, every page is reachable from the README, and the library example
of docs/losses.md runs (the README's own example is run by tests/test_losses.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def _text(path: Path) -> str:
    return FENCE.sub("", path.read_text())  # a link-like string inside a code block is not a link


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_text(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", _text(path), flags=re.M)}


def test_there_are_docs_pages():
    names = {p.name for p in PAGES}
    assert {"training.md", "data.md", "losses.md", "evaluation.md", "margins.md", "scale-out.md",
            "performance.md", "troubleshooting.md", "architecture.md"} <= names


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_readme_is_a_front_page_that_links_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the detail into docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [p.name for p in PAGES if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"
    assert "make test" in README.read_text() and "make demo" in README.read_text()


def test_the_anchor_check_can_fail(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title\n\n## Changing a preset\n")
    assert _anchors(page) == {"title", "changing-a-preset"}
    assert _links(tmp_path / "a.md") == []
    page.write_text("see [x](b.md#nowhere) and [y](https://example.org) and\n```\n[z](c.md)\n```\n")
    assert _links(page) == ["b.md#nowhere"]


def test_the_losses_page_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "losses.md").read_text(), flags=re.S)
    assert blocks, "docs/losses.md has no python example"
    for code in blocks:
        exec(compile(code, "docs/losses.md", "exec"), {"__name__": "docs_example"})
