"""Overlapping the Python work of building bulk statements with the database's work of executing them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy.orm import Session


class Pipeline:
    """Overlap building statements (Python) with executing them (the database), in one transaction.

    ``submit(function, *args)`` runs ``function`` on a single worker thread, in submission order, and
    returns a future. The session is only used by the worker while the caller builds the next statement's
    parameters: drivers release the GIL while the server works, so on two cores the client's and the
    server's work overlap. After a submitted function fails, the ones submitted after it raise the same
    exception instead of running (so ``result()`` of any later future reports the first error, not the
    aborted transaction). Leaving the ``with`` block waits for the worker, before the session commits or
    rolls back. SQLite runs in this process (there is no server to overlap with): with ``threaded=False``
    each function runs at once, in the caller's thread.
    """

    def __init__(self, threaded: bool = True) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="astra-recording") if threaded else None
        )
        self._error: BaseException | None = None

    @classmethod
    def for_session(cls, session: Session) -> Pipeline:
        return cls(threaded=session.get_bind().dialect.name == "postgresql")

    def _run(self, function: Callable[..., Any], args: tuple) -> Any:
        if self._error is not None:
            raise self._error
        try:
            return function(*args)
        except BaseException as error:
            self._error = error
            raise

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        if self._executor is not None:
            return self._executor.submit(self._run, function, args)
        future: Future = Future()
        try:
            future.set_result(self._run(function, args))
        except BaseException as error:  # raised again by result(), as from the worker
            future.set_exception(error)
        return future

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["Pipeline"]
