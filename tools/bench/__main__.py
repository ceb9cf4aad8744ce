"""`python -m tools.bench`: the benchmark program that `govledger bench` runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from service import log as logging_setup
from tools.bench import runner


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="govledger bench",
        description="Benchmarks, each figure beside a baseline from the same run.",
    )
    runner.add_arguments(p)
    args = p.parse_args(argv)
    logging_setup.configure()
    return runner.main(args)


if __name__ == "__main__":
    sys.exit(main())
