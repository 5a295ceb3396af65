"""docs/cli.md, written from the command's own parsers: every subcommand, argument and default, so the
reference cannot drift from the command (tests/test_docs.py fails when the file differs). Regenerate::

    .venv/bin/python -m cnnserve.command.clidoc > docs/cli.md
"""

from __future__ import annotations

import argparse

HEADER = """# Command reference: `cnnserve`

Every subcommand and argument of the `cnnserve` command, written from its own parser
(`.venv/bin/python -m cnnserve.command.clidoc > docs/cli.md`; `tests/test_docs.py` fails when this file and the
command differ). `cnnserve COMMAND --help` prints the same. A bad input ends with one line,
`cnnserve: error: ...`, and exit status 2; `CNNSERVE_DEBUG=1` shows the traceback instead.
The service's own settings (`bentoml serve --arg key=value`) are in [serving.md](serving.md).
"""


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser by name (``bench`` and ``tune``: the harness's own, from the checkout's
    ``bench/``, which this runs in)."""
    from cnnserve.command.cli import build_parser, harness_parsers

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    found = dict(sub.choices)
    found.update(harness_parsers())
    return found


def summaries() -> dict[str, str]:
    from cnnserve.command.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help or "" for a in sub._choices_actions}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"`{name}`" + (" ..." if action.nargs in ("+", "*", argparse.REMAINDER) else "")
    if action.nargs == 0:
        return ", ".join(f"`{o}`" for o in action.option_strings)
    metavar = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices
                                 else action.dest.upper())
    more = " ..." if action.nargs in ("+", "*") else ""
    return ", ".join(f"`{o} {metavar}{more}`" for o in action.option_strings)


def _meaning(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    if action.required and action.option_strings:
        text = f"required. {text}"
    default = action.default
    if (action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS, [])
            and "default" not in text):
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default {shown})".strip()
    return _cell(text)


def markdown() -> str:
    out = [HEADER]
    helps = summaries()
    for name, parser in parsers().items():
        out.append(f"## cnnserve {name}\n")
        about = parser.description or helps.get(name, "")
        if about:
            out.append(" ".join(about.split()) + "\n")
        usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
        out.append(f"```\n{usage}\n```\n")
        rows = [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
        if rows:
            out.append("| argument | meaning |\n|---|---|")
            out += [f"| {_argument(a)} | {_meaning(parser, a)} |" for a in rows]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
