"""Admission by measured capacity: a search is admitted only when it is expected to start within a deadline.

The models share one device (one device lock), so the searches in flight are served one device batch after
another. The controller measures what one search costs the device: over windows of completed searches,
the device seconds the workers spent (every batch's run time, from :class:`~alignfuse.service.batching.
BatchEvent`) divided by the searches completed, smoothed by an EWMA. Under load that figure already
includes what micro-batching saves. A new search expects to wait about ``in_flight × cost``; when that is
over ``max_queue_wait_ms`` it is rejected at once (429, ``Retry-After`` = the time the excess takes to
drain), before any work is done for it. So the admitted searches finish within about the deadline plus
their own service time, however many clients push, and what the server holds (queued jobs, their tensors)
is bounded by the deadline instead of by the number of clients.

After a spike the freed tensors return to the allocator, but glibc keeps the pages of its heaps: when the
server goes idle (nothing in flight) :func:`trim_memory` hands them back to the OS (``malloc_trim``), at
most once per ``trim_interval_s``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionConfig:
    """``max_queue_wait_s``: the longest expected wait a search is admitted with (0 turns the capacity
    check off; the hard cap ``max_in_flight`` stays). ``initial_cost_s``: the per-search device cost
    assumed before anything was measured. ``window``: completed searches per cost measurement.
    ``alpha``: weight of the newest measurement in the EWMA."""

    max_queue_wait_s: float = 1.0
    max_in_flight: int = 256
    initial_cost_s: float = 0.05
    window: int = 8
    alpha: float = 0.3
    trim_interval_s: float = 2.0


@dataclass(frozen=True)
class Decision:
    admitted: bool
    expected_wait_s: float
    retry_after_s: float
    reason: str = ""


class Admission:
    """Thread-safe admission controller (see the module docstring)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.in_flight = 0
        self.cost_s = config.initial_cost_s
        self._busy_s = 0.0  # device seconds since the last measurement
        self._done = 0  # searches completed since the last measurement
        self._last_trim = 0.0
        self._spiked = False  # something was admitted since the last trim
        self.loop_lag_s = 0.0
        """How late the event loop runs its timers (EWMA, set by :meth:`observe_loop_lag`): when the
        process is starved of CPU (or of the GIL), every request waits that long before any stage."""

    def observe_loop_lag(self, lag_s: float) -> None:
        lag = max(0.0, lag_s)
        # rise at once, decay smoothly: a starved loop must start shedding immediately
        self.loop_lag_s = lag if lag > self.loop_lag_s else 0.8 * self.loop_lag_s + 0.2 * lag

    def device_time(self, seconds: float) -> None:
        """A worker spent ``seconds`` on one batch (called from the device threads)."""
        with self._lock:
            self._busy_s += seconds

    def expected_wait(self) -> float:
        return self.in_flight * self.cost_s + self.loop_lag_s

    def would_reject(self) -> Decision | None:
        """The rejection a new search would get now (no state changes): lets the HTTP layer refuse before
        reading the body. None when it would be admitted."""
        d = self._decide()
        return None if d.admitted else d

    def _decide(self) -> Decision:
        cfg = self.config
        wait = self.in_flight * self.cost_s + self.loop_lag_s
        if self.in_flight >= cfg.max_in_flight:
            return Decision(False, wait, self._retry_after(wait), "concurrency")
        if cfg.max_queue_wait_s > 0 and self.in_flight > 0 and wait > cfg.max_queue_wait_s:
            return Decision(False, wait, self._retry_after(wait), "capacity")
        return Decision(True, wait, 0.0)

    def try_enter(self) -> Decision:
        with self._lock:
            d = self._decide()
            if not d.admitted:
                return d
            self.in_flight += 1
            self._spiked = True
            return d

    def _retry_after(self, wait: float) -> float:
        return max(1.0, wait - self.config.max_queue_wait_s)

    def leave(self) -> bool:
        """A search finished (or failed). True when nothing is in flight any more."""
        cfg = self.config
        with self._lock:
            self.in_flight -= 1
            self._done += 1
            if self._done >= cfg.window:
                measured = self._busy_s / self._done
                if measured > 0 and math.isfinite(measured):
                    self.cost_s = (1 - cfg.alpha) * self.cost_s + cfg.alpha * measured
                self._busy_s, self._done = 0.0, 0
            return self.in_flight == 0

    def due_for_trim(self) -> bool:
        """Idle after admitting work, and the last trim is old enough: time to return freed pages."""
        now = time.monotonic()
        with self._lock:
            if self.in_flight or not self._spiked or now - self._last_trim < self.config.trim_interval_s:
                return False
            self._last_trim, self._spiked = now, False
            return True


_LIBC: ctypes.CDLL | None = None
_LIBC_CHECKED = False


def trim_memory() -> bool:
    """``malloc_trim(0)``: give the free pages of glibc's heaps back to the OS. False where unavailable."""
    global _LIBC, _LIBC_CHECKED
    if not _LIBC_CHECKED:
        _LIBC_CHECKED = True
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else None
        except OSError:
            _LIBC = None
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True
