"""Run every benchmark in its own interpreter and print their reports."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    failed = 0
    for name in sorted(os.listdir(HERE)):
        if name.startswith("bench_") and name.endswith(".py"):
            print(f"== {name}", flush=True)
            failed |= subprocess.run([sys.executable, os.path.join(HERE, name)]).returncode
            print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
