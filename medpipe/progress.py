"""One line of progress for logs: how far, how long so far, how long still (every long
command prints these, so a Snakemake or SLURM log says where a job is)."""

from __future__ import annotations

import time

from rich.console import Console

_console = Console(stderr=True, soft_wrap=True)


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def timing(done: int, total: int, elapsed: float) -> str:
    """`H:MM:SS elapsed, H:MM:SS left`, the rest estimated from the pace so far."""
    left = (total - done) * elapsed / max(done, 1)
    return f"{clock(elapsed)} elapsed, {clock(left)} left"


def report_step(what: str, done: int, total: int, started: float) -> None:
    """Print `WHAT done/total | elapsed, left` to stderr; STARTED is a perf_counter time."""
    _console.print(f"{what} {done}/{total} | {timing(done, total, time.perf_counter() - started)}",
                   highlight=False)
