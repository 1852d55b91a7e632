"""The load generator: an open model, like k6's ``constant-arrival-rate`` executor.

Request ``k`` is due at ``start + k * batch / rate`` whatever happened to the earlier ones: a
slow relay does not slow the arrivals down (a closed model, where each client waits for its
answer before sending again, would hide exactly the stalls we want to see). At most
``concurrency`` requests are in flight; when all are busy the next request starts as soon as
one finishes, and how late it started is recorded (a *late start*: the load was not what was
asked, and the report says so).

A request the relay did not answer (connection refused while it restarts, a reset, a 503, a
timeout) is retried with the same messages until ``give_up_seconds`` pass: that is what a
careful client does, and it is safe because the relay answers a repeat inside its dedup window
with the original's id (``"duplicate": true``).

Threading: :meth:`OpenModelLoad.run` schedules on the calling thread and sends on a pool of
``concurrency`` threads, each with its own keep-alive ``requests.Session``.
:class:`RelaySampler` polls ``GET /v1/stats`` on a daemon thread of its own.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from .check import Submission, message_text

RETRY_FIRST_SECONDS = 0.2
RETRY_CAP_SECONDS = 2.0


@dataclass(frozen=True)
class LoadPlan:
    """What to send: ``messages`` messages at ``rate`` a second, ``batch`` to a request.

    ``batch == 1`` uses ``POST /v1/messages``; more uses ``POST /v1/messages/batch``.
    Message ``seq`` goes to chat ``chat_base + seq % chats`` with the text
    ``"<run_id> #<seq>"``, so every message is unique and traceable.
    """

    url: str
    run_id: str
    rate: float
    messages: int
    batch: int = 1
    concurrency: int = 32
    chats: int = 1000
    chat_base: int = 7_000_000
    give_up_seconds: float = 120.0
    request_timeout: float = 30.0
    auth_token: str = ""
    late_after_seconds: float = 0.1

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.messages < 1 or self.batch < 1 or self.concurrency < 1:
            raise ValueError("rate, messages, batch and concurrency must be positive")
        if self.chats < 1:
            raise ValueError("chats must be positive")

    @property
    def requests(self) -> int:
        return math.ceil(self.messages / self.batch)

    @property
    def interval(self) -> float:
        """Seconds between two scheduled requests."""
        return self.batch / self.rate

    def chat_of(self, seq: int) -> int:
        return self.chat_base + seq % self.chats

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}


@dataclass
class LoadResult:
    """What the client did and heard. Times are wall-clock unless named ``*_seconds``."""

    submissions: list[Submission]
    started_at: float
    finished_at: float
    scheduled_requests: int
    lateness_seconds: list[float]
    late_starts: int
    attempts: int
    retries: dict[str, int]
    answer_seconds: list[float] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(1 for submission in self.submissions if submission.accepted)


class OpenModelLoad:
    """Runs a :class:`LoadPlan` against the relay's HTTP API."""

    def __init__(self, plan: LoadPlan, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.plan = plan
        self._clock = clock
        self._wall = wall
        self._local = threading.local()
        self._lock = threading.Lock()
        self._submissions: list[Submission | None] = [None] * plan.messages
        self._retries: Counter[str] = Counter()
        self._attempts = 0
        self._answer_seconds: list[float] = []

    @property
    def accepted_so_far(self) -> int:
        return sum(1 for submission in self._submissions if submission is not None and submission.accepted)

    def run(self, stop: threading.Event | None = None) -> LoadResult:
        """Send the plan on schedule; returns when every request has an outcome."""
        plan = self.plan
        stop = stop or threading.Event()
        slots = threading.BoundedSemaphore(plan.concurrency)
        lateness: list[float] = []
        futures: list[Future[None]] = []
        started_at, start = self._wall(), self._clock()
        with ThreadPoolExecutor(plan.concurrency, thread_name_prefix="load") as pool:
            for index in range(plan.requests):
                due = start + index * plan.interval
                if stop.wait(max(0.0, due - self._clock())):
                    break
                slots.acquire()
                lateness.append(max(0.0, self._clock() - due))
                futures.append(pool.submit(self._request_guarded, index, slots))
        finished_at = self._wall()
        for future in futures:
            future.result()  # a bug in the client must not pass for a quiet run
        submissions = [s for s in self._submissions if s is not None]
        return LoadResult(
            submissions=submissions, started_at=started_at, finished_at=finished_at,
            scheduled_requests=len(lateness), lateness_seconds=lateness,
            late_starts=sum(1 for late in lateness if late > plan.late_after_seconds),
            attempts=self._attempts, retries=dict(self._retries.most_common()),
            answer_seconds=self._answer_seconds)

    def _request_guarded(self, index: int, slots: threading.BoundedSemaphore) -> None:
        try:
            self._request(index)
        finally:
            slots.release()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.plan.headers())
            self._local.session = session
        return session

    def _request(self, index: int) -> None:
        plan = self.plan
        seqs = range(index * plan.batch, min(plan.messages, (index + 1) * plan.batch))
        bodies: list[dict[str, Any]] = [{"chat_id": plan.chat_of(seq), "text": message_text(plan.run_id, seq)}
                                        for seq in seqs]
        submitted_at = self._wall()
        deadline = self._clock() + plan.give_up_seconds
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self._attempts += 1
            began = self._clock()
            try:
                reason = self._attempt(bodies, seqs, submitted_at, attempt)
            except requests.RequestException as error:
                reason = type(error).__name__
            if reason is None:
                with self._lock:
                    self._answer_seconds.append(self._clock() - began)
                return
            with self._lock:
                self._retries[reason] += 1
            pause = min(RETRY_CAP_SECONDS, RETRY_FIRST_SECONDS * 1.5 ** (attempt - 1))
            pause *= random.uniform(0.75, 1.25)
            if self._clock() + pause > deadline:
                for seq, body in zip(seqs, bodies, strict=True):
                    self._submissions[seq] = Submission(
                        seq, body["chat_id"], body["text"], submitted_at, None, None,
                        "unanswered", f"gave up after {attempt} attempts (last: {reason})", attempt)
                return
            time.sleep(pause)

    def _attempt(self, bodies: list[dict[str, Any]], seqs: range, submitted_at: float,
                 attempt: int) -> str | None:
        """One HTTP request; ``None`` when every message got an answer, else why to retry."""
        plan = self.plan
        session = self._session()
        if plan.batch == 1:
            response = session.post(f"{plan.url}/v1/messages", json=bodies[0], timeout=plan.request_timeout)
            if response.status_code in (200, 202, 400, 409, 413):
                self._record(seqs[0], bodies[0], response.status_code, _json(response),
                             submitted_at, attempt)
                return None
            return f"HTTP {response.status_code}"
        response = session.post(f"{plan.url}/v1/messages/batch", json={"messages": bodies},
                                timeout=plan.request_timeout)
        if response.status_code != 200:
            if response.status_code in (400, 413):
                for seq, body in zip(seqs, bodies, strict=True):
                    self._record(seq, body, response.status_code, _json(response), submitted_at, attempt)
                return None
            return f"HTTP {response.status_code}"
        results = _json(response).get("results") or []
        for seq, body, result in zip(seqs, bodies, results, strict=True):
            self._record(seq, body, int(result.get("http_status", 0)), result, submitted_at, attempt)
        return None

    def _record(self, seq: int, body: dict[str, Any], status: int, answer: dict[str, Any],
                submitted_at: float, attempt: int) -> None:
        answered_at = self._wall()
        if status in (200, 202):
            outcome = "duplicate" if answer.get("duplicate") else "accepted"
            message_id = answer.get("id")
            detail = ""
        else:
            outcome, message_id = "rejected", None
            detail = f"HTTP {status}: {answer.get('error', '')}"[:200]
        self._submissions[seq] = Submission(seq, body["chat_id"], body["text"], submitted_at,
                                            answered_at, message_id, outcome, detail, attempt)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class RelaySampler:
    """Polls ``GET /v1/stats`` every ``interval`` seconds: the relay's own view of its backlog.

    A sample is ``{"at": wall time, "counts": {...}, "in_flight", "in_doubt"}``, or
    ``{"at": ..., "down": "why"}`` while the relay does not answer (a restart, say).
    """

    def __init__(self, url: str, headers: dict[str, str], interval: float = 2.0) -> None:
        self._url = url
        self._headers = headers
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def start(self) -> RelaySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with requests.Session() as session:
            session.headers.update(self._headers)
            while not self._stop.wait(self._interval):
                at = time.time()
                try:
                    stats = session.get(f"{self._url}/v1/stats", timeout=self._interval * 2).json()
                    self.samples.append({"at": at, "counts": stats.get("counts", {}),
                                         "in_flight": stats.get("in_flight"),
                                         "in_doubt": stats.get("in_doubt")})
                except (requests.RequestException, ValueError) as error:
                    self.samples.append({"at": at, "down": type(error).__name__})
