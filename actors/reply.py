"""A one-shot reply slot for commands that are answered later (after a commit).

The subset of :class:`concurrent.futures.Future` tgrelay uses, made cheaper: waiting is a
single lock acquire in C instead of a Condition. Acceptance wakes one waiting caller per
message, so this is on the hottest path there is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_GUARD = threading.Lock()  # held for a few instructions only, so one lock serves every reply


class Reply(Generic[T]):
    __slots__ = ("_callbacks", "_done", "_error", "_gate", "_value")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()  # released once, when the outcome is known
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Reply[T]], Any]] = []

    def set_result(self, value: T) -> None:
        self._value = value
        self._finish()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        with _GUARD:
            if self._done:
                raise RuntimeError("a reply can be given only once")
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        self._gate.release()
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Reply[T]], Any]) -> None:
        """Run ``callback(self)`` when done: in the answering thread, or now if done already."""
        with _GUARD:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        return self._done

    def _wait(self, timeout: float | None) -> None:
        if not self._gate.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("no reply in time")
        self._gate.release()  # let any other waiter through too

    def result(self, timeout: float | None = None) -> T:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error
