"""``import forksafe`` must be cheap: it is added to every process of a tree.

Each round starts two fresh interpreters with ``-X importtime``: one that
imports only what every program imports anyway (the baseline: ``import os``)
and one that imports forksafe, and reads forksafe's cumulative import time from
the interpreter's own report. Printed: the median in milliseconds (target: at
most 20 ms) and the ratio of a whole ``python -c "import forksafe"`` start-up
to a bare ``python -c "import os"`` start-up measured alternately in the same
run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import line

ROUNDS = 30


def startup(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - start, proc.stderr


def forksafe_cumulative_us(report: str) -> int:
    for row in report.splitlines():
        parts = [p.strip() for p in row.split("|")]
        if len(parts) == 3 and parts[2] == "forksafe":
            return int(parts[1])
    raise RuntimeError("forksafe is missing from the -X importtime report")


def main() -> None:
    base, cand, imports = [], [], []
    for _ in range(ROUNDS):
        base.append(startup("import os")[0])
        seconds, report = startup("import forksafe")
        cand.append(seconds)
        imports.append(forksafe_cumulative_us(report))
    median_ms = statistics.median(imports) / 1000
    verdict = "ok" if median_ms <= 20 else "MISSED"
    print(f"{'import forksafe (-X importtime)':40} median {median_ms:.2f} ms "
          f"(target <= 20 ms: {verdict})")
    print(line("interpreter start-up with the import", statistics.median(base),
               statistics.median(cand)))


if __name__ == "__main__":
    main()
