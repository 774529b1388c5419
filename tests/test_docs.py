"""The docs a newcomer reads hold together: every relative link in README.md and docs/*.md
reaches a file (and, with ``#anchor``, a heading of it, by GitHub's slug rules), the README
stays short, nothing cites the development notes outside the repository, and the
architecture map in docs/architecture.md places every module of msn_ds in the layer that
tests/test_layering.py checks."""
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# Built from pieces, so that this file does not cite what it forbids.
FORBIDDEN = ("DESIGN" + ".md", ".." + "/shared")

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str):
    """``(line number, line)`` outside fenced code blocks, inline code removed."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, re.sub(r"`[^`]*`", "", line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation other
    than ``-`` and ``_`` removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading's anchor in a markdown file, duplicates numbered as GitHub does."""
    seen: dict = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path):
    """``(line number, target)`` of every relative link in a markdown file."""
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                yield n, target


def test_the_slug_rules():
    assert github_slug("1. The method") == "1-the-method"
    assert github_slug("What happens when…") == "what-happens-when"
    assert github_slug("One run per folder: `--resume auto`, `--overwrite`, the lock") == \
        "one-run-per-folder---resume-auto---overwrite-the-lock"
    assert github_slug("The reference's released weights") == "the-references-released-weights"
    assert github_slug("k-NN and the linear probe") == "k-nn-and-the-linear-probe"


def test_pages_exist():
    names = {p.name for p in PAGES[1:]}
    for name in ("index.md", "method.md", "training.md", "checkpoints.md", "data.md",
                 "evaluation.md", "performance.md", "reliability.md", "differences.md",
                 "architecture.md", "testing.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for n, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{n}: ({target})"
        if not dest.exists():
            broken.append(f"{where}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: {dest.name} has no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_every_page_is_reachable_from_the_index():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    missing = [p.name for p in PAGES[1:] if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link to: {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into docs/")


def project_files():
    """Tracked files and untracked ones that git does not ignore (new docs included)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = {n for n in out.decode("utf-8", "surrogateescape").split("\0") if n}
    names |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    return sorted(n for n in names if (ROOT / n).is_file())


def test_nothing_cites_the_development_notes():
    me = str(Path(__file__).relative_to(ROOT))
    hits = []
    for name in project_files():
        if name == me:
            continue
        data = (ROOT / name).read_bytes()
        for n, line in enumerate(data.splitlines(), 1):
            for word in FORBIDDEN:
                if word.encode() in line:
                    hits.append(f"{name}:{n}: {line.decode('utf-8', 'replace').strip()}")
    assert not hits, ("cite docs/method.md instead of the development notes:\n"
                      + "\n".join(hits))


def layering():
    spec = importlib.util.spec_from_file_location("_layering",
                                                  ROOT / "tests" / "test_layering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def architecture_map() -> dict:
    """``{module path: layer number}`` from docs/architecture.md's map."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    layer, out = None, {}
    for line in block.splitlines():
        m = re.match(r"^layer (\d+)", line)
        if m:
            layer = int(m.group(1))
        elif line.startswith("msn_ds/"):
            out[line.split()[0]] = layer
    return out


def test_architecture_map_matches_the_layers():
    lay = layering()
    shown = architecture_map()
    problems = []
    for module, is_package, path in lay.package_modules():
        rel = str(path.relative_to(ROOT))
        if is_package:
            continue
        if rel not in shown:
            problems.append(f"{rel} is not in docs/architecture.md's map")
            continue
        want = lay.layer_of(module[len(lay.PACKAGE) + 1:])
        if want is None or want[1] != shown[rel]:
            problems.append(f"{rel}: the map says layer {shown[rel]}, tests/test_layering.py "
                            f"says {None if want is None else want[1]}")
    for rel in shown:
        if not (ROOT / rel).is_file():
            problems.append(f"docs/architecture.md's map names {rel}, which does not exist")
    assert not problems, "\n".join(problems)
    assert len({layer for layer in shown.values()}) == len(lay.LAYERS)


def test_makefile_has_the_readme_commands():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", make, re.M), f"Makefile has no {target} target"
        assert f"make {target}" in readme
