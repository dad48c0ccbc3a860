"""Prints the measured meta-gradient differences of ``test_agreement.py``."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    module = sys.modules.get("benchmarks.peers.test_agreement")
    measured = getattr(module, "MEASURED", None)
    if not measured:
        return
    write = terminalreporter.write_line
    write("")
    write("max over parameters of |g - g_ref| / |g_ref| (meta-gradients):")
    write(f"{'g vs g_ref':<40} {'order':<6} {'workload':<26} {'steps':>5} {'diff':>9}")
    for (what, order, workload, steps), diff in sorted(measured.items()):
        write(f"{what:<40} {order:<6} {workload:<26} {steps:>5} {diff:>9.2e}")
