"""The documentation: every relative link and image resolves (files and ``#anchors``, GitHub-style
slugs), the README stays short and reaches every page, its Python example runs, and the commands it
shows exist."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCHMARKS = ROOT / "benchmarks" / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
PAGES = [README, *DOCS, BENCHMARKS, CHANGELOG]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
#: [text](target) and ![alt](target); the target ends at the first space or ')'.
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def code_blocks(text: str, language: str) -> List[str]:
    """The bodies of the fenced blocks opened with ```language."""
    blocks, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```") and stripped[3:].strip() == language:
                current = []
        elif stripped.startswith("```"):
            blocks.append("\n".join(current) + "\n")
            current = None
        else:
            current.append(line)
    assert current is None, f"unclosed ```{language} block"
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)        # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("\\", "")
    text = text.replace("**", "").replace("__", "")
    text = text.strip().lower()
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (repeats get -1, -2, ...)."""
    seen: Dict[str, int] = {}
    found: Set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> List[Tuple[int, str]]:
    """``(line, target)`` of every Markdown and HTML link or image outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in MD_LINK.finditer(line)]
        found += [(number, m.group(1)) for m in HTML_LINK.finditer(line)]
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)) or target.startswith("//")


def relative_targets(path: Path) -> List[Tuple[int, Path, str]]:
    """``(line, resolved file, anchor)`` of every relative link of ``path``."""
    out = []
    for number, target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        out.append((number, resolved, anchor))
    return out


# --------------------------------------------------------------------------------------------------
# the helpers themselves
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heading, expected", [
    ("The plateau of constant scores, and `--fast_start`", "the-plateau-of-constant-scores-and---fast_start"),
    ("The paper's table", "the-papers-table"),
    ("Data (`bench_data.py`, `bench_semantics.py`)", "data-bench_datapy-bench_semanticspy"),
    ("1,000 images x 5,000 captions", "1000-images-x-5000-captions"),
    ("Features simulated from real captions (`vsl.demo.simulate`)",
     "features-simulated-from-real-captions-vsldemosimulate"),
    ("**Bold** and [a link](x.md)", "bold-and-a-link"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_link_parser_sees_links_images_and_anchors_but_not_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\nSee [a](docs/a.md#x), ![img](fig.png) and <img src=\"b.png\">, "
                    "`[not](code.md)`, [web](https://example.org).\n\n```\n[also not](c.md)\n```\n"
                    "## Top\n", encoding="utf-8")
    assert [t for _, t in links(page)] == ["docs/a.md#x", "fig.png", "https://example.org", "b.png"]
    assert anchors(page) == {"top", "top-1"}


# --------------------------------------------------------------------------------------------------
# the pages
# --------------------------------------------------------------------------------------------------
def test_the_pages_exist():
    assert len(DOCS) >= 5, f"docs/ holds {len(DOCS)} pages; expected at least five"
    for page in (README, BENCHMARKS, CHANGELOG):
        assert page.is_file(), f"{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for number, target, anchor in relative_targets(page):
        if not target.exists():
            broken.append(f"{page.name}:{number}: {target.relative_to(ROOT)} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{page.name}:{number}: no heading #{anchor} in {target.relative_to(ROOT)}")
        elif anchor and target.suffix != ".md":
            broken.append(f"{page.name}:{number}: anchor #{anchor} on a non-Markdown file")
    assert not broken, "\n".join(broken)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}"


def test_readme_reaches_every_page_and_every_figure():
    reached = {target for _, target, _ in relative_targets(README)}
    missing = [p.relative_to(ROOT) for p in [*DOCS, BENCHMARKS, CHANGELOG] if p.resolve() not in reached]
    assert not missing, f"README.md does not link to {missing}"
    shown = {target for page in PAGES for _, target, _ in relative_targets(page)}
    figures = sorted((ROOT / "docs").glob("*.png"))
    unlinked = [f.name for f in figures if f.resolve() not in shown]
    assert not unlinked, f"figures not shown on any page: {unlinked}"


def test_readme_keeps_the_fresh_machine_commands_verbatim():
    bash = code_blocks(README.read_text(encoding="utf-8"), "bash")
    install = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]"'
    assert f"{install} && vsl demo\n" in bash
    assert f"{install} && python -m pytest -q\n" in bash
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci and 'pip install -q -e ".[test]"' in ci


# --------------------------------------------------------------------------------------------------
# what the pages show
# --------------------------------------------------------------------------------------------------
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "README.md has no ```python example"
    monkeypatch.chdir(tmp_path)
    for number, block in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md python block {number}", "exec"), {"__name__": "__readme__"})
    assert "rsum" in out.getvalue()                   # the example prints its recall table


def cli_help(argv: List[str], capsys) -> str:
    from vsl.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--help"])
    assert exit_info.value.code == 0, f"vsl {' '.join(argv)} --help exited with {exit_info.value.code}"
    return capsys.readouterr().out


def shown_commands(page: Path) -> Iterator[Tuple[str, List[str]]]:
    """``(line, argv after 'vsl')`` of every ``vsl ...`` / ``-m vsl ...`` command in bash blocks."""
    for block in code_blocks(page.read_text(encoding="utf-8"), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            for i, word in enumerate(words):
                if word == "vsl" and (i == 0 or words[i - 1] in ("-m", "&&", "srun")):
                    yield line, words[i + 1:]
                    break


def canonical(flag: str) -> str:
    return flag.replace("-", "_").lstrip("_")


def test_commands_shown_in_the_docs_exist(capsys):
    """Every `vsl CMD --flag` on the pages is a command with that option (the underscore and the
    hyphenated spellings count as one)."""
    top = cli_help([], capsys)
    commands = set(re.findall(r"^    ([a-z][a-z-]+)\s", top, re.MULTILINE))
    assert {"train", "eval", "demo", "serve"} <= commands
    options: Dict[str, Set[str]] = {}
    problems = []
    for page in [README, *DOCS]:
        for line, argv in shown_commands(page):
            if not argv or argv[0].startswith("-"):
                continue
            command = argv[0]
            if command not in commands:
                problems.append(f"{page.name}: unknown command in {line!r}")
                continue
            if command not in options:
                options[command] = {canonical(f) for f in re.findall(r"--[a-z][\w-]*", cli_help([command], capsys))}
            for flag in (w.split("=")[0] for w in argv[1:] if w.startswith("--")):
                if canonical(flag) not in options[command]:
                    problems.append(f"{page.name}: vsl {command} has no option {flag} ({line!r})")
    assert not problems, "\n".join(problems)
