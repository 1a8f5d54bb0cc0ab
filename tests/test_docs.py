"""The documentation holds together: every relative link in README.md and docs/**/*.md resolves
(files exist, ``#anchors`` name a heading of the target file by GitHub's slug rules), and every
``flowmanip ...`` command shown in a shell block of README.md, docs/cli.md or docs/deploy.md parses
with the CLI's own parser (a wrong flag or an unknown recipe key fails here).

Fast and offline: no env, no training, no network.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND_DOCS = [REPO / "README.md", REPO / "docs" / "cli.md", REPO / "docs" / "deploy.md"]
SHELL_FENCES = {"bash", "sh", "shell", "console"}

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def _code_blocks(path: Path):
    """(language, first line number, lines) of every fenced code block."""
    fence, lang, start, lines = None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, start, lines = m.group(1), m.group(2).lower(), number + 1, []
        elif fence is not None and m and m.group(1) == fence and not m.group(2):
            yield lang, start, lines
            fence = None
        elif fence is not None:
            lines.append(line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lower-cased, punctuation
    other than '-' and '_' removed, each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<![\w])_+|_+(?![\w])", "", text)  # _emphasis_ markers, not snake_case
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ " or (ord(c) > 127 and c.isalpha()))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_slug_rules():
    assert github_slug("Flow-T with 8 Euler steps") == "flow-t-with-8-euler-steps"
    assert github_slug("Lifting weak BC policies (StackCube, PickCube from 10 demos)") == \
        "lifting-weak-bc-policies-stackcube-pickcube-from-10-demos"
    assert github_slug("`flowmanip eval`: K = 8") == "flowmanip-eval-k--8"
    assert github_slug("Where Flow-T fails (2026-11-26)") == "where-flow-t-fails-2026-11-26"
    assert github_slug("success_once and **bold**") == "success_once-and-bold"


def _links():
    for path in DOCS:
        for number, line in _prose_lines(path):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                yield pytest.param(path, number, target, id=f"{path.relative_to(REPO)}:{number}:{target}")


@pytest.mark.parametrize("path,number,target", list(_links()))
def test_relative_link_resolves(path, number, target):
    where = f"{path.relative_to(REPO)}:{number}: link {target!r}"
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    assert dest.exists(), f"{where}: {dest} does not exist"
    if anchor:
        assert dest.is_file() and dest.suffix == ".md", f"{where}: an anchor needs a markdown file"
        assert anchor in anchors(dest), f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}"


def test_docs_are_found_and_link_somewhere():
    assert (REPO / "docs" / "results.md") in DOCS and (REPO / "docs" / "cli.md") in DOCS
    assert len(list(_links())) > 20


def _shown_commands():
    """flowmanip command lines in the shell blocks of the command docs, continuation lines joined."""
    for path in COMMAND_DOCS:
        for lang, start, lines in _code_blocks(path):
            if lang not in SHELL_FENCES:
                continue
            joined, first = "", None
            for offset, line in enumerate(lines):
                if first is None:
                    first = start + offset
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                words = shlex.split(joined, comments=True)
                first_line, joined = first, ""
                first = None
                if words and words[0] == "$":
                    words = words[1:]
                if "flowmanip" in words[:1]:
                    argv = words[1:]
                elif "-m" in words and words[words.index("-m") + 1:][:1] == ["flowmanip"]:
                    argv = words[words.index("-m") + 2:]  # accelerate launch ... -m flowmanip ...
                else:
                    continue
                yield pytest.param(argv, id=f"{path.relative_to(REPO)}:{first_line}:{' '.join(argv)[:60]}")


SHOWN = list(_shown_commands())


def test_readme_shows_the_quickstart_and_the_test_command():
    ids = [p.id for p in SHOWN if p.id.startswith("README.md")]
    shown = [" ".join(p.values[0]) for p in SHOWN if p.id.startswith("README.md")]
    assert "pretrain recipes/pickcube.yaml" in shown and "finetune recipes/pickcube.yaml" in shown, ids
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in text
    assert len(text.splitlines()) <= 120


@pytest.mark.parametrize("argv", SHOWN)
def test_shown_command_parses(argv, capsys):
    from flowmanip import cli

    # the subcommand exists and its --help works
    sub = argv[:2] if argv[:1] == ["demos"] else argv[:1]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*sub, "--help"])
    assert exit_info.value.code == 0, f"flowmanip {' '.join(sub)} --help exited {exit_info.value.code}"

    # the whole line parses: argparse exits with code 2 on an unknown flag or a missing argument
    try:
        args = cli.parse_args(list(argv))
    except SystemExit as e:
        pytest.fail(f"`flowmanip {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()} (exit {e.code})")

    # recipe overrides name real keys with valid values
    if args.command in ("pretrain", "finetune") and (REPO / args.recipe).is_file():
        from flowmanip.config import load_recipe

        load_recipe(str(REPO / args.recipe), args.overrides)
