"""The documentation's relative links resolve inside the repository (a clone has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    p
    for p in [ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/**/*.md")]
    if p.is_file()
)
#: ``[text](target)`` links and bare ``<img src=...>``; external schemes and pure anchors are skipped.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")


def relative_links(text: str) -> list[str]:
    out = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in relative_links(doc.read_text()):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(root):
            bad.append(f"{doc.relative_to(root)}: {target} points outside the repository")
        elif not path.exists():
            bad.append(f"{doc.relative_to(root)}: {target} does not exist")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repo(doc):
    assert broken_links(doc) == []


def test_the_checker_catches_bad_links(tmp_path):
    (tmp_path / "a.md").write_text("[ok](b.md) [gone](c.md) [out](../x.md) [web](https://x.org) [anchor](#h)\n")
    (tmp_path / "b.md").write_text("")
    assert broken_links(tmp_path / "a.md", tmp_path) == [
        "a.md: c.md does not exist",
        "a.md: ../x.md points outside the repository",
    ]


def test_readme_first_screen_has_install_command_and_matrix():
    """The first screen (about 60 lines) holds the install line, the main command and the support matrix."""
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    assert "pip install" in head
    assert "examples/generate.py" in head
    assert re.search(r"^\|.*H100.*\|.*B200.*\|", head, re.M), "support matrix with an H100 and a B200 column"
