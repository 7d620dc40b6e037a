"""The ``captioner`` command line.

Sub-commands are contributed by packages through the ``captioner.commands`` entry-point group
(``pyproject.toml``). Each entry point names a function ``register(subparsers)`` that adds its
sub-parsers and sets ``func`` on them; ``func(args) -> int | None`` is the exit status.
This keeps the core package free of imports from ``training`` and ``service``.

A sub-parser that sets a ``deferred_args`` default parses its own arguments when it runs: the words after
it that this parser does not know go to ``args.deferred_args`` instead of being an error (``captioner train
STAGE``: only the chosen stage's module is imported, training/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points

from captioning import __version__
from captioning.errors import CaptionerError

# No model hubs or telemetry: everything is built from configs and local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class CaptionerParser(argparse.ArgumentParser):
    """An ArgumentParser that hands the unknown words to a command which parses its own (``deferred_args``)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        if extra and isinstance(getattr(parsed, "deferred_args", None), list):
            parsed.deferred_args = [*parsed.deferred_args, *extra]
            extra = []
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    parser = CaptionerParser(
        prog="captioner",
        description="Image captioning: synthetic data, offline training, model store, service.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="captioner.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and ep.value.startswith(exc.name):
                continue  # that package's commands are not in this checkout yet
            raise
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = func(args)
    except CaptionerError as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
