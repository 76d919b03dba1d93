"""The repository is self-contained: no file points at documents outside it, and every link resolves.

The reference documentation lives in docs/. A comment, docstring, test or page that cites a
design or style document kept elsewhere (a sibling ``shared`` folder) sends a reader to a
file they do not have; so does a Markdown link to a path that does not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match its own patterns.
OUTSIDE_REFERENCES = re.compile(
    r"\.\./" + "shared"  # the sibling folder the design notes once lived in
    + r"|\b" + "DESIGN" + r"(\.md|'s\b|\s*§)"  # the design notes by file name, possessive or section sign
    + r"|\b" + "STYLE" + r"\.md"
)
# Folders never part of the repository's own files, for the walk used outside a git checkout.
NOT_OURS = {".git", ".venv", ".pytest_cache", ".hypothesis", "__pycache__", "spur_assets.egg-info", ".spur"}


def repository_files() -> list[Path]:
    """Files of the repository: tracked ones plus new ones not ignored (git), else a walk of the tree."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.decode("utf-8").split("\0")
        paths = [REPO / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if not NOT_OURS & set(p.relative_to(REPO).parts)]
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def markdown_pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").rglob("*.md"))]
    return [page for page in pages if page.is_file()]


FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` that point into the repository.

    Code (fenced blocks and inline spans) is not prose, so links shown there are skipped; so
    are web addresses and links to an anchor of the same page.
    """
    prose = INLINE_CODE.sub("", FENCED_CODE.sub("", text))
    targets = []
    for target in MARKDOWN_LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        targets.append(target)
    return targets


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCED_CODE.sub("", page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_no_file_refers_to_documents_outside_the_repository():
    offenders = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_REFERENCES.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "point these into docs/ instead:\n" + "\n".join(offenders)


def test_outside_reference_pattern_catches_each_form():
    # The pattern is built in pieces; make sure the pieces catch what they are meant to.
    for cited in ("see ../" + "shared/notes.md", "DESIGN" + ".md §4", "DESIGN" + "'s claim", "DESIGN" + " §2",
                  "STYLE" + ".md: two layers"):
        assert OUTSIDE_REFERENCES.search(cited), cited
    for fine in ("docs/definitions.md#spurious-pairs", "a design choice", "DESIGNER"):
        assert not OUTSIDE_REFERENCES.search(fine), fine


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_relative_markdown_links_resolve(page: Path):
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path_part = target.split("#", 1)[0]
        resolved = (page.parent / path_part).resolve()
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target} (leaves the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


DOCS_POINTER = re.compile(r"\bdocs/([\w\-/]+\.md)(?:#([\w\-]+))?")


def test_pointers_into_docs_name_existing_pages_and_headings():
    # Code and tests cite "docs/definitions.md#spurious-pairs"; the page and the heading must exist.
    anchors: dict[Path, set[str]] = {}
    broken = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for page_name, anchor in DOCS_POINTER.findall(text):
            page = REPO / "docs" / page_name
            if not page.is_file():
                broken.append(f"{path.relative_to(REPO)}: docs/{page_name} does not exist")
                continue
            if anchor and anchor not in anchors.setdefault(page, heading_anchors(page)):
                broken.append(f"{path.relative_to(REPO)}: docs/{page_name} has no heading #{anchor}")
    assert not broken, "\n".join(sorted(set(broken)))


def test_link_and_anchor_helpers_on_a_known_case(tmp_path):
    text = (
        "See [defs](docs/definitions.md#spurious-pairs), ![plot](img/a.png \"title\") and "
        "[web](https://example.org), [here](#top), `[code](not/a/link.md)`.\n"
        "```\n[fenced](also/not.md)\n```\n"
    )
    assert relative_links(text) == ["docs/definitions.md#spurious-pairs", "img/a.png"]
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Spurious pairs\n## ODmAP@k, image → text\n## Spurious pairs\n", encoding="utf-8")
    assert heading_anchors(page) == {"title", "spurious-pairs", "odmapk-image--text", "spurious-pairs-1"}
