"""``python -m portmla {info,demo,bench}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="portmla", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    info = sub.add_parser("info", help="platform, toolchains, built modules, backends and their reasons")
    info.add_argument("--device", default=None)
    demo = sub.add_parser("demo", help="a DeepSeek-shaped decode + layer step on the best backend, "
                                       "checked against the reference")
    demo.add_argument("--device", default=None)
    demo.add_argument("--backend", default="auto")
    sub.add_parser("bench", help="benchmarks (python -m portmla bench --help)")
    args = parser.parse_args(argv or ["info"])
    if args.cmd in (None, "info"):
        from .cli_info import print_info

        print_info(getattr(args, "device", None))
        return 0
    from .demo import run_demo

    return run_demo(args.device, args.backend)


if __name__ == "__main__":
    sys.exit(main())
