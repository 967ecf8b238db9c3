"""Links between the documents resolve: every relative link in README.md, docs/*.md and
deploy/README.md names an existing file, and a #fragment into a Markdown file names one of
its headings (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "deploy" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def links(text: str) -> list[str]:
    """Targets of inline, image and reference links, in order."""
    found = []
    for line in prose_lines(text):
        prose = re.sub(r"`[^`]*`", "``", line)  # code spans are not links
        found += LINK.findall(prose)
        found += REFERENCE.findall(prose)
    return found


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for
    repeats."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(text):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower())
        slug = slug.replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_link_finder_reads_markdown_links() -> None:
    """Inline, image and reference links are found; code is not read as links."""
    text = "[a](x.md) ![i](img.png \"t\") `[no](code.md)`\n[ref]: y.md\n```\n[no](z.md)\n```\n"
    assert ["x.md", "img.png", "y.md"] == links(text)


def test_anchors_follow_github() -> None:
    """Headings become lower-case, hyphenated anchors; a repeated heading gets -1."""
    text = ("# Deploy `iptsync`: the DaemonSet\n## Roll back\n"
            "```\n# not a heading\n```\n## Roll back\n")
    assert {"deploy-iptsync-the-daemonset", "roll-back", "roll-back-1"} == anchors(text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    """Each relative link's file exists; its #fragment, if any, is a heading there."""
    assert document.is_file()
    broken = []
    for link in links(document.read_text()):
        if SCHEME.match(link):
            continue
        target, _, fragment = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        missing = not path.exists()
        checks_anchor = not missing and bool(fragment) and path.suffix == ".md"
        if missing or (checks_anchor and fragment not in anchors(path.read_text())):
            broken.append(link)
    assert [] == broken
