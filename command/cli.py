"""The ``cnnserve`` command: one door with subcommands.

Parsers are declared beside their handlers (``make.py``: train, export, import, quantize, visualize,
store; ``serve.py``: up, score, container; here: models, and the doors to bench and tune); each handler
imports its module only when it runs, so the serving commands never import torch and ``cnnserve --help``
is instant. A bad input ends with one line, ``cnnserve: error: ...``, and exit status 2; set
``CNNSERVE_DEBUG=1`` to see the traceback instead.

``bench`` and ``tune`` run the benchmark harness, which is no part of the installed package: it lives in
the repository's ``bench/`` (with the tests' server runner it shares, ``tests/support/``) and needs the
test extras (aiohttp, psutil) and wrk. From a checkout (``./run.sh`` installs it editable) these two
commands import it from there; from a wheel without one they say so in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import make, remote, rollout, serve


def _cmd_models(args) -> int:
    from cnnserve import models
    from cnnserve.models.summary import format_table, human, summarize_arch

    if args.name and ":" in args.name and any(ch in args.name for ch in "*?["):
        from cnnserve.models.pretrained import library_models

        lib, _, pattern = args.name.partition(":")
        names = library_models(lib, pattern)
        print("\n".join(f"{lib}:{n}" for n in names) if names else f"{lib} has no architecture matching {pattern!r}")
        return 0
    if args.name:
        entry = models.get_entry(args.name)
        classes = args.classes or (10 if entry.spec.channels == 1 else 1000)
        s = summarize_arch(args.name, classes, args.channels, args.img_size)
        if args.summary:
            print(format_table(s))
        else:
            print(f"{entry.name}: {entry.description}\n  input {'x'.join(map(str, s.input))}, "
                  f"{classes} classes: {s.params:,} parameters, {s.macs:,} multiply-adds")
        return 0
    rows = []
    for name in models.list_models():
        e = models.get_entry(name)
        classes = 10 if e.spec.channels == 1 else 1000
        s = summarize_arch(name, classes)
        rows.append((name, e.family, "x".join(map(str, s.input)), str(classes), f"{s.params:,}", human(s.macs),
                     e.description))
    head = ("name", "family", "input", "classes", "params", "MACs", "description")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i in (0, 1, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


# --- bench and tune: the checkout's harness ------------------------------------------------------

HARNESS_COMMANDS = {
    # name: its line in `cnnserve --help` (its own options are the harness's: `cnnserve NAME --help`)
    "tune": "choose the service's settings for a model by measuring them here",
    "bench": "the benchmark harness (`cnnserve bench --help` lists its options)",
}


def checkout_root() -> Path | None:
    """The repository checkout whose ``bench/`` holds the harness: the one this cnnserve was installed from
    (editable: the folder above ``command/``), else the current directory; None where neither is one (a
    wheel installed elsewhere)."""
    import cnnserve.command

    for root in (Path(cnnserve.command.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "harness.py").is_file() and (root / "tests" / "support" / "__init__.py").is_file():
            return root
    return None


def use_checkout(command: str) -> None:
    """Make the checkout's ``bench`` and ``tests.support`` importable (its root first on sys.path: done for
    bench and tune only, so that no other command can import a repository folder by a bare name), or
    refuse in one line where there is no checkout."""
    root = checkout_root()
    if root is None:
        what = ("is the benchmark harness" if command == "bench" else
                "measures with the benchmark harness (its server runner and wrk, and the test extras)")
        raise HarnessMissing(f"`cnnserve {command}` {what} in the repository's bench/, which the installed package "
                             f"does not carry: run it in a checkout of the repository (./run.sh installs cnnserve "
                             f"there; then .venv/bin/cnnserve {command} ...)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


class HarnessMissing(LookupError):
    """No checkout of the repository here: bench and tune cannot run."""


def harness_parsers() -> dict[str, argparse.ArgumentParser]:
    """bench's and tune's own parsers, from the checkout (docs/cli.md is written from them)."""
    use_checkout("bench")
    from bench.harness import build_parser as bench_parser

    return {"tune": _tune_parser(), "bench": bench_parser()}


def _tune_parser() -> argparse.ArgumentParser:
    """``cnnserve tune``'s parser as the harness declares it, under the same program name."""
    from bench import tune

    top = argparse.ArgumentParser(prog="cnnserve")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tune.add_parser(sub)
    return sub.choices["tune"]


def _cmd_harness(args) -> int:  # reached only through parse_args (main sends bench and tune to the harness first)
    return main([args.command, *args.harness_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve", description="Train CNNs, export them to ONNX, serve them with BentoML.")
    from cnnserve import __version__

    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures, or describe one",
                       description="List the registry with input size, parameters and multiply-adds; describe one "
                                   "architecture (a zoo name, timm:NAME or torchvision:NAME); or list a library's "
                                   "architectures by a pattern: cnnserve models 'timm:*resnet*'.")
    p.add_argument("name", nargs="?", help="one architecture, or LIBRARY:PATTERN (timm:*res*, torchvision:*)")
    p.add_argument("--summary", action="store_true", help="layer-by-layer table")
    p.add_argument("--classes", type=int, help="number of classes (default 10 for grey models, 1000 for RGB)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="input channels (default: the architecture's)")
    p.add_argument("--img-size", type=int, help="input side in pixels (default: the architecture's)")
    p.set_defaults(func=_cmd_models)

    make.add_parsers(sub)
    serve.add_parsers(sub)
    remote.add_parsers(sub)  # load, unload, repository: models at runtime in a running service
    rollout.add_parsers(sub)  # evaluate, replay: a model against labelled images or captured traffic
    for name, summary in HARNESS_COMMANDS.items():  # their parsers are the checkout's (main sends them there)
        p = sub.add_parser(name, help=summary, add_help=False)
        p.add_argument("harness_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_harness)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    if command in HARNESS_COMMANDS:
        try:
            use_checkout(command)
        except HarnessMissing as e:
            print(f"cnnserve: error: {e}", file=sys.stderr)
            return 2
        if command == "bench":  # the harness parses its own options (argparse's REMAINDER would not take them)
            from bench.harness import main as bench_main

            return bench_main(argv[1:])
        args = _tune_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("cnnserve: interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError) as e:
        # Every error the project raises for bad input is a ValueError or KeyError subclass with a
        # message that names the file or the value; OSError covers files that vanish or cannot be written.
        if os.environ.get("CNNSERVE_DEBUG"):
            raise
        print(f"cnnserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
