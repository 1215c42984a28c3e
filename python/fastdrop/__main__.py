"""``python -m fastdrop bench [options]``: see ``fastdrop.bench``."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m fastdrop bench [--quick] [--sizes 1K,1M] [--dtype float32] "
            "[--threads N] [--json FILE] [--plot FILE]\n"
            "       python -m fastdrop bench --help   for every option"
        )
        return 0 if argv else 2
    if argv[0] != "bench":
        print(f"unknown command {argv[0]!r}; the only command is 'bench'", file=sys.stderr)
        return 2
    from .bench import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
