"""Periodic jobs (housekeeping, integrity checks) on one daemon thread.

A job that raises is reported through the alert sink and runs again at its next tick: the
scheduler never dies silently and never hides an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.observe import AlertSink

log = logging.getLogger("tgrelay.scheduler")


@dataclass
class _Job:
    name: str
    interval: float
    run: Callable[[], object]
    due: float = field(default=0.0)


class Scheduler:
    def __init__(self, alert: AlertSink) -> None:
        self._alert = alert
        self._jobs: list[_Job] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tgrelay-scheduler", daemon=True)

    def every(self, seconds: float, name: str, run: Callable[[], object], *,
              first_after: float | None = None) -> None:
        delay = seconds if first_after is None else first_after
        self._jobs.append(_Job(name, seconds, run, time.monotonic() + delay))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for job in self._jobs:
                if job.due <= now:
                    job.due = now + job.interval
                    self._run(job)
            next_due = min((job.due for job in self._jobs), default=now + 1)
            self._stopping.wait(max(0.01, min(1.0, next_due - time.monotonic())))

    def _run(self, job: _Job) -> None:
        try:
            job.run()
        except Exception as error:
            log.exception("scheduled job %s failed", job.name)
            self._alert("persistence" if job.name.startswith("store") else "scheduler",
                        f"scheduled job {job.name} failed: {error}")
