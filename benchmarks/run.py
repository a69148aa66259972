"""Run every benchmark in this folder, one after another (``make bench``).

Each script writes its table to ``benchmarks/results/<name>.md``; run one alone with
``.venv/bin/python benchmarks/<script>.py`` (see its docstring for options and expected time).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SKIP = {"run.py", "__init__.py"}


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP)
    if argv:
        scripts = [p for p in scripts if any(a in p.stem for a in argv)]
    failed = []
    for p in scripts:
        print(f"== {p.name}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(p)])
        print(f"== {p.name}: exit {rc} in {time.perf_counter() - t:.0f}s", flush=True)
        if rc:
            failed.append(p.name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
