"""The README and docs/ cannot drift from the project: every relative link resolves (files and their
headings), every `cnnserve` subcommand and option written in them exists in the command's own parser,
every `--arg key=value` names a service argument, docs/cli.md is what the parser says, and
docs/serving.md names every service argument. Nothing here is a hand-kept list."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND_LANGS = {"", "bash", "sh", "shell", "console"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The page without its fenced blocks (links inside code are not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", prose(path.read_text()), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def parsers() -> dict[str, argparse.ArgumentParser]:
    from cnnserve.command.clidoc import parsers

    return parsers()


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def command_lines(page: Path) -> list[str]:
    """Shell lines of the page's command blocks (continuations joined) and its inline code spans that
    run cnnserve."""
    text = page.read_text()
    found = []
    for lang, body in FENCE.findall(text):
        if lang in COMMAND_LANGS:
            found += [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    found += [span for span in re.findall(r"`([^`\n]+)`", prose(text))
              if re.match(r"^(\S*/)?cnnserve\s|^\./run\.sh (up|container)\b", span)]
    return found


def words_of(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote (an apostrophe in a comment): split on blanks
        return line.split("#", 1)[0].split()


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its words) for every cnnserve run on the line: `cnnserve`, `.venv/bin/cnnserve`,
    and ./run.sh up/container (which pass their arguments to cnnserve up/container)."""
    words = [w.strip("[]") for w in words_of(line)]
    found = []
    for i, w in enumerate(words):
        if (w.endswith("/cnnserve") or w == "cnnserve") and i + 1 < len(words):
            found.append((words[i + 1], words[i + 2:]))
        elif w == "./run.sh" and i + 1 < len(words) and words[i + 1] in ("up", "container"):
            found.append((words[i + 1], words[i + 2:]))
    return found


def test_every_cnnserve_command_in_the_docs_exists():
    commands = parsers()
    wrong, seen = [], 0
    for page in PAGES:
        for line in command_lines(page):
            for sub, words in invocations(line):
                if sub.isupper():  # a placeholder: `cnnserve COMMAND --help`
                    continue
                seen += 1
                where = f"{page.relative_to(ROOT)}: {line.strip()[:100]}"
                if sub not in commands:
                    wrong.append(f"{where}: no subcommand {sub!r}")
                    continue
                for word in words:
                    if word in ("|", "&&", ";", ">", "2>&1") or word.endswith("/cnnserve"):
                        break  # the next command
                    flag = word.split("=", 1)[0]
                    if flag.startswith("--") and flag not in options(commands[sub]):
                        wrong.append(f"{where}: cnnserve {sub} has no option {flag}")
    assert seen > 30, f"only {seen} cnnserve commands found: the parser of this test is broken"
    assert not wrong, "\n".join(wrong)


def test_every_service_argument_in_the_docs_exists():
    from cnnserve.core.config import Settings

    known = set(Settings.model_fields)
    wrong, seen = [], 0
    for page in PAGES:
        for line in command_lines(page):
            words = words_of(line)
            for flag, value in zip(words, words[1:]):
                if flag == "--arg":
                    seen += 1
                    key = value.split("=", 1)[0]
                    if key not in known:
                        wrong.append(f"{page.relative_to(ROOT)}: --arg {value}: no service argument {key!r}")
    assert seen >= 5 and not wrong, wrong


def test_cli_reference_is_written_from_the_parser():
    from cnnserve.command.clidoc import markdown

    assert (ROOT / "docs" / "cli.md").read_text() == markdown(), (
        "docs/cli.md differs from the command: .venv/bin/python -m cnnserve.command.clidoc > docs/cli.md")


def test_cli_reference_explains_every_argument():
    from cnnserve.command.clidoc import markdown

    empty = [line for line in markdown().splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not empty, f"arguments without a help text: {empty}"


def test_serving_reference_names_every_service_argument():
    from cnnserve.core.config import Settings

    table = (ROOT / "docs" / "serving.md").read_text().split("| argument |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(\w+)`", table))
    missing = sorted(set(Settings.model_fields) - named)
    assert not missing, f"docs/serving.md's argument table lacks {missing}"


def test_readme_is_a_front_door():
    """What it is, the two commands, the tour, and the reference linked, in that order; the reference
    itself lives in docs/."""
    readme = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", readme, re.M)
    assert heads[:3] == ["Quickstart", "A 5-minute tour", "Documentation"], heads
    for page in ("cli", "serving", "models", "scoring", "containers", "reliability", "benchmarks", "design",
                 "dependencies", "troubleshooting"):
        assert f"(docs/{page}.md)" in readme, page
    assert len(readme.splitlines()) < 200
