"""Start-up time of the CLI: `prefalign --help`, `train --help`, `losses`, `--version`.

Each command runs as a fresh subprocess (what a user waits for), 5 times; the median is printed
with the machine's CPU and load. The goal (issue 14): under 1 s for --help and train --help.
Not a test: times depend on the machine. Where the time goes:
    python -X importtime -m prefalign.cli --help 2> imports.txt; sort -t'|' -k2 -n imports.txt | tail

    PYTHONPATH=src python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from prefalign import hardware

COMMANDS = (["--version"], ["--help"], ["train", "--help"], ["sft", "--help"], ["grpo", "--help"], ["losses"])


def time_command(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefalign.cli", *args], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    runs = p.parse_args().runs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {hardware.cpu_name()} ({os.cpu_count()} logical cores, load {load:.1f}); Python {platform.python_version()}")
    for args in COMMANDS:
        times = time_command(args, runs)
        print(f"prefalign {' '.join(args):14s} median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}; {runs} runs)")


if __name__ == "__main__":
    main()
