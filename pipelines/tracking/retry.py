"""How long the tracker keeps asking a silent tracking server: one retry budget per tracker."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.tracking import MlflowClient

from components.errors import TaskatlasError

DEFAULT_RETRY_S = 60.0  # `tracking.retry_s`


_PAUSE_FIRST_S, _PAUSE_MAX_S = 0.5, 4.0  # between attempts while a server does not answer


class TrackingUnavailable(TaskatlasError):
    """The tracking server did not answer for the run's whole retry budget: the run stops."""


def request_timeout_s(retry_s: float) -> int:
    """How long one request waits for an answer: half the budget, 5 to 30 s. A server that takes
    connections and never answers stops a run after at most `retry_s` plus this."""
    return int(min(30, max(5, math.ceil(retry_s / 2))))


def use_retry_budget(retry_s: float) -> None:
    """MLflow's own HTTP retries off in this process, and one request's wait bounded: a
    `RetryBudget` retries instead, on one budget for the whole run. (By default MLflow retries
    each request 7 times, ~4 minutes, and a failure handler's requests start over.) MLflow reads
    these variables at every request (`mlflow.utils.rest_utils.http_request`); Ray workers call
    this through `RunLogger`, so a cluster's workers need nothing in their runtime env."""
    MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(0)
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.set(0)
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.set(0.0)
    MLFLOW_HTTP_REQUEST_TIMEOUT.set(request_timeout_s(retry_s))


def unanswered(err: BaseException) -> bool:
    """Whether a tracking call failed for want of an answer (refused, timed out, or MLflow's
    transient statuses: 429, 5xx), not because the server refused the request."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class RetryBudget:
    """One budget of `retry_s` seconds for all of a run's tracking calls while the server does
    not answer. A call without an answer is tried again (pauses of 0.5 s doubling to 4 s) until
    the server has been silent `retry_s` seconds, counted from the first unanswered attempt of any
    call (threads share it) and reset by any answer. Then that call, and every later one at once
    and without a request, raise `TrackingUnavailable`: a failure handler starts no second round."""

    def __init__(
        self,
        tracking_uri: str,
        retry_s: float = DEFAULT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.tracking_uri, self.retry_s = tracking_uri, retry_s
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._silent_since: float | None = None  # the first unanswered attempt since an answer
        self._gave_up_after: float | None = None  # seconds of silence, once the budget is spent

    @property
    def spent(self) -> bool:
        """Whether the server is known dead: every call now fails at once."""
        return self._gave_up_after is not None

    def error(self) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"tracking_uri: the tracking server at {self.tracking_uri} did not answer for "
            f"{self._gave_up_after or 0:.0f} s (tracking.retry_s: {self.retry_s:g}); finished work is"
            " on disk, and the next run logs what is missing"
        )

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        pause = _PAUSE_FIRST_S
        while True:
            if self.spent:
                raise self.error()
            started = self._clock()
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if not unanswered(err):
                    raise
                with self._lock:
                    if self._silent_since is None or started < self._silent_since:
                        self._silent_since = started
                    silent = self._clock() - self._silent_since
                    if silent >= self.retry_s and self._gave_up_after is None:
                        self._gave_up_after = silent
                if self.spent:
                    raise self.error() from None
                self._sleep(min(pause, self.retry_s - silent))
                pause = min(2 * pause, _PAUSE_MAX_S)
                continue
            with self._lock:
                self._silent_since = None
            return result


class BudgetedClient:
    """An `MlflowClient` whose every method call goes through a `RetryBudget`."""

    def __init__(self, client: MlflowClient, budget: RetryBudget):
        self.raw, self._budget = client, budget

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("raw", "_budget"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        value = getattr(self.raw, name)
        return functools.partial(self._budget.call, value) if callable(value) else value
