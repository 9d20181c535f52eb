"""Per-kernel time of a zoo model (or any model file): where the milliseconds go.

    python benchmarks/profile_kernels.py resnet18 [--layout nhwc] [--top 25] [--repeat 50]

A thin wrapper over ``graphopt profile`` (:mod:`graphopt.profiling`) that also takes the
name of a built-in example model: builds it for x86, times every kernel on its own, says
which schedule rule made it and prints the fast-path coverage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graphopt.profiling import profile, render
from graphopt.zoo import ZOO, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=f"a zoo name ({', '.join(ZOO)}) or a model file")
    parser.add_argument("--layout", help="x86 layout (default: the target's)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--overhead", action="store_true", help="also the cost of one call")
    args = parser.parse_args()
    model = build(args.model) if args.model in ZOO and not Path(args.model).exists() else args.model
    result = profile(model, "x86", layout=args.layout, repeat=args.repeat, overhead=args.overhead)
    render(result, top=args.top)


if __name__ == "__main__":
    main()
