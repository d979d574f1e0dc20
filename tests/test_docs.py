"""The README and docs/ say only what is true: links resolve, commands and options exist.

Each check collects what the pages name (links, `sae-registry COMMAND`, `--options` after a command)
and asks the real thing (the file system, the click CLI's --help), so a renamed command or a removed
option fails here instead of in a reader's terminal.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae_registry.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# `sae-registry [--tracking-uri X] COMMAND`, also as `.venv/bin/sae-registry`; not `~/.cache/sae-registry`.
INVOCATION = re.compile(r"(?<![\w/.-])(?:\.venv/bin/)?sae-registry((?:\s+--[\w-]+(?:[= ][^\s-][^\s]*)?)*)\s+([a-z][a-z_-]*)\b")
GROUP_OPTIONS_WITH_VALUE = {"--tracking-uri"}
FORBIDDEN = re.compile(r"issues?[\s#-]*\d+|closing note", re.I)


def code_lines(text: str) -> list[str]:
    """Every line of every fenced code block, and every inline code span, of a page."""
    without_fences = FENCE.sub("", text)
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return lines + INLINE.findall(without_fences)


def invocations(text: str) -> list[tuple[str, str, list[str]]]:
    """(command, group options, options after the command) for each `sae-registry COMMAND ...` in code."""
    found = []
    for line in code_lines(text):
        # A comment is prose; a pipe, `&&` or `;` ends what belongs to sae-registry.
        command = "" if line.lstrip().startswith("#") else re.split(r"\s#", line)[0]
        for piece in re.split(r"\s\|\s|&&|;", command):
            for m in INVOCATION.finditer(piece):
                group_opts = re.findall(r"--[\w-]+", m.group(1))
                rest = piece[m.end():]
                nxt = INVOCATION.search(rest)
                rest = rest[: nxt.start()] if nxt else rest
                found.append((m.group(2), group_opts, re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)))
    return found


@cache
def help_text(command: str | None) -> tuple[int, str]:
    """Exit code and output of `sae-registry [COMMAND] --help`, through click's test runner."""
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


def declared_options(command: str | None) -> set[str]:
    return set(re.findall(r"--[a-z][\w-]*", help_text(command)[1]))


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("training.md", "stores.md", "registry.md", "sweeps.md", "interchange.md", "evaluation.md",
                 "benchmarks.md", "architecture.md", "deploy.md", "errors.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_point_at_files_in_the_repository(page: Path):
    text = page.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in (path, *path.parents):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing in the repository: {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    linked = {Path(t.split("#", 1)[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    missing = {p.name for p in PAGES[1:]} - linked
    assert not missing, f"README.md does not point to {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_page_cites_issues_or_notes(page: Path):
    hits = [m.group(0) for m in FORBIDDEN.finditer(page.read_text())]
    assert not hits, f"{page.name} mentions {hits}: say what is true instead of where it was decided"


def test_the_forbidden_pattern_catches_citations():
    for cited in ("see issue 5", "Issue #12", "the issue-5 closing note", "issues 11"):
        assert FORBIDDEN.search(cited), cited
    assert not FORBIDDEN.search("an issue with 5 stores")


def test_invocation_parser_reads_commands_and_options():
    """The collector itself: a page that names a command and an option must yield them."""
    text = (
        "Run `sae-registry list FAMILY` or\n\n```bash\n"
        ".venv/bin/sae-registry --tracking-uri http://h:5000 train --store s --k 32   # --not-this\n"
        "ray job submit -- sae-registry sweep jobs/a.yaml --resume | tee log --also-not\n"
        "ls ~/.cache/sae-registry --all\n"
        "docker compose build     # the sae-registry image\n```\n"
    )
    assert sorted(invocations(text)) == [
        ("list", [], []),
        ("sweep", [], ["--resume"]),
        ("train", ["--tracking-uri"], ["--store", "--k"]),
    ]


def all_invocations() -> list[tuple[str, str, list[str], list[str]]]:
    return [(page.name, cmd, group, opts) for page in PAGES for cmd, group, opts in invocations(page.read_text())]


def test_the_pages_name_commands():
    commands = {cmd for _, cmd, _, _ in all_invocations()}
    for expected in ("harvest", "train", "sweep", "list", "show", "promote", "ui", "demo"):
        assert expected in commands, f"no page shows `sae-registry {expected}`"


@pytest.mark.parametrize("command", sorted({cmd for _, cmd, _, _ in all_invocations()}))
def test_every_command_named_is_a_real_command(command: str):
    code, output = help_text(command)
    assert code == 0, f"`sae-registry {command} --help` exits {code}: {output}"
    assert "Usage:" in output and command in output


def test_every_option_written_after_a_command_exists():
    wrong = []
    for page, cmd, group, opts in all_invocations():
        if help_text(cmd)[0] != 0:
            continue  # reported by test_every_command_named_is_a_real_command
        known = declared_options(cmd)
        wrong += [f"{page}: sae-registry {cmd} {o}" for o in opts if o not in known]
        wrong += [f"{page}: sae-registry {o} ... {cmd}" for o in group if o not in declared_options(None)]
    assert not wrong, "options the CLI does not have:\n" + "\n".join(wrong)


def test_readme_setup_commands_are_the_ci_command():
    readme = (ROOT / "README.md").read_text()
    first_block = FENCE.search(readme)
    assert first_block, "README.md should open with the set-up commands in a code block"
    commands = [line.split("  #")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    ci_run = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_run == ["bash scripts/setup.sh --test && bash scripts/lint.sh && .venv/bin/python -m pytest"]
    assert commands == ["bash scripts/setup.sh && .venv/bin/sae-registry demo", ci_run[0]]
