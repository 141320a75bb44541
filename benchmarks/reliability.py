"""Regenerate the reliability table of BENCHMARKS.md from a run of the fault-injection suite.

    python benchmarks/reliability.py            # runs the suite (a few minutes on 2 CPU cores), rewrites the table

The suite's tests record what they observed (tests/faultlog.py, enabled by DINOLIKE_FAULT_REPORT) only
after their assertions passed; a fault whose test failed shows as "not verified". The table replaces
whatever stands between the `reliability:begin` / `reliability:end` markers. Exit status: the suite's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_faults_train.py", "tests/test_faults_input.py", "tests/test_faults_run.py",
         "tests/test_faults_edges.py", "tests/test_curation_resume.py",
         # the check that the table is current: this script is what makes it current
         "--deselect", "tests/test_faults_input.py::test_reliability_table_lists_every_fault_the_suite_asserts"]
TARGET = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def run_suite() -> tuple[int, dict[str, list[str]]]:
    """Run the suite with recording on; (pytest's status, fault -> observations)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "DINOLIKE_FAULT_REPORT": str(report), "PYTHONPATH": str(ROOT)}
        status = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *SUITE], cwd=ROOT,
                                env=env).returncode
        observed: dict[str, list[str]] = defaultdict(list)
        for line in report.read_text().splitlines() if report.is_file() else []:
            row = json.loads(line)
            observed[row["fault"]].append(row["observed"])
    return status, observed


def write_table(table: str, target: Path = TARGET) -> None:
    text = target.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{target} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    target.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from faultlog import render

    status, observed = run_suite()
    table = render(observed)
    write_table(table)
    print(table)
    print(f"\nwritten to {TARGET} (suite exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
