"""What the benchmark scripts say about the machine they ran on (standard library only: bench/soak.py runs
without torch)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of every thread, CPU seconds of the main threads) of process ``pid`` and its descendants,
    user + system, from /proc (Linux; (0, 0) elsewhere). A service's event loop runs on its main thread, so
    the second number over a request count is the event loop's cost a request; the first adds the device
    workers and the decode pool."""
    tick = os.sysconf("SC_CLK_TCK")
    total = main = 0.0
    pending = [pid]
    while pending:
        proc = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{proc}/task/{tid}/stat") as f:
                    # Fields after the ")" that closes the command name: utime and stime are the 12th and 13th.
                    fields = f.read().rpartition(")")[2].split()
                with open(f"/proc/{proc}/task/{tid}/children") as f:
                    pending.extend(int(child) for child in f.read().split())
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / tick
            total += seconds
            if int(tid) == proc:
                main += seconds
    return total, main
