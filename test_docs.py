"""The repository explains itself: every reference in the README, --help texts and comments
resolves inside the repository (issue 13, point 8).

Users get this repository and nothing beside it, so a pointer to an engineers' note outside it
("SPEC section 6", "METRICS.md", "../shared/...") is a dead end; the facts live in docs/protocol.md
and docs/metrics.md, cited as "docs/protocol.md §N". The README's links to files (figures under
results/, docs pages) must exist too.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
SCRIPTS = ("train.py", "evaluate.py", "infer.py", "bench.py", "experiments.py", "plot.py")
# Names of files that exist only on the development machines, never in a clone of this repository.
OUTSIDE = re.compile(r"\bSPEC\b|SPEC\.md|\bMETRICS\.md|\bMETRICS \d|STYLE \d|STYLE\.md|\.\./shared")


def repository_files() -> list[Path]:
    """The text files a user reads: code, docs, requirements (tests may point at the development
    copy of CamVid as a fallback, so they are checked for the note names only)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    names = tracked.stdout.split() if tracked.returncode == 0 else [
        str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [REPO / n for n in names if n.endswith((".py", ".md", ".txt", ".ini")) or n == ".ci/run"]


def test_no_reference_points_outside_the_repository():
    bad = []
    for path in repository_files():
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits = OUTSIDE.findall(line)
            if path.name.startswith("test_"):  # the CamVid fallback path is allowed in tests
                hits = [h for h in hits if h != "../shared"]
            if hits:
                bad.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_texts_cite_nothing_outside_the_repository(script):
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not OUTSIDE.findall(done.stdout), done.stdout


def test_every_docs_section_cited_exists():
    """"docs/protocol.md §6", "docs/metrics.md §3.4": the page exists and has that numbered section
    (a "## 6." heading, or item 4 of section 3 for "§3.4")."""
    cited = re.compile(r"docs/(\w+\.md) §(\d+)(?:\.(\d+))?(?:-(\d+))?")
    pages: dict[str, str] = {}
    missing = []
    for path in repository_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for page, section, item, last in cited.findall(line):
                if page not in pages:
                    target = REPO / "docs" / page
                    pages[page] = target.read_text(encoding="utf-8") if target.is_file() else ""
                text = pages[page]
                for s in range(int(section), int(last or section) + 1):
                    heading = re.search(rf"^## {s}\. .*$", text, re.M)
                    ok = heading is not None
                    if ok and item:  # item N of that section: a line "N. ..." before the next heading
                        body = text[heading.end():].split("\n## ")[0]
                        ok = re.search(rf"^{item}\. ", body, re.M) is not None
                    if not ok:
                        missing.append(f"{path.relative_to(REPO)}:{number}: docs/{page} §{s}{'.' + item if item else ''}")
    assert pages, "no docs/ reference found at all: the check would pass vacuously"
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


def test_readme_links_point_at_files_that_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)       # [text](path) and ![alt](path)
    local = [link for link in links if "://" not in link]
    assert local, "the README links no file of the repository"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
