"""The ``cnnserve`` command: one door with subcommands.

Parsers are declared beside their handlers (``make.py``: train, export, import, quantize, visualize,
store; ``serve.py``: up, score, container; here: models and bench); each handler imports its module
only when it runs, so the serving commands never import torch and ``cnnserve --help`` is instant.
A bad input ends with one line, ``cnnserve: error: ...``, and exit status 2; set
``CNNSERVE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import make, remote, serve


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


def _cmd_bench(args) -> int:  # reached only through parse_args (main sends `bench ...` to the harness first)
    from cnnserve.bench.harness import main as bench_main

    return bench_main(args.bench_args)


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
    from cnnserve.bench import tune  # its parser; what it measures with is imported when it runs

    tune.add_parser(sub)
    p = sub.add_parser("bench", help="the benchmark harness (`cnnserve bench --help` lists its options)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness parses its own options (argparse's REMAINDER would not take them)
        from cnnserve.bench.harness import main as bench_main

        return bench_main(argv[1:])
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
