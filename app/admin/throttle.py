"""Failed-login throttling for the admin page: a password guesser gets a handful of tries, then waits.

Failures are counted per (client address, username) and per client address, in a sliding window; past either
limit the login form answers 429 with Retry-After, without checking the password. A successful login clears
its (address, username) count. Counts live in the server process (one serve process per catalog is the
deployment this page is for; several processes each keep their own counts).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class LoginThrottle:
    def __init__(
        self,
        per_user: int = 5,
        per_address: int = 20,
        window_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_user, self.per_address, self.window_s, self.clock = per_user, per_address, window_s, clock
        self._failures: dict[tuple[str, str | None], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str | None], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, address: str, username: str) -> int:
        """Seconds until this address may try this username again; 0: it may try now."""
        now = self.clock()
        with self._lock:
            waits = []
            for key, limit in (((address, username), self.per_user), ((address, None), self.per_address)):
                times = self._recent(key, now)
                if len(times) >= limit:
                    waits.append(times[len(times) - limit] + self.window_s - now)
            return max(1, int(max(waits)) + 1) if waits else 0

    def failed(self, address: str, username: str) -> None:
        now = self.clock()
        with self._lock:
            for key in ((address, username), (address, None)):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, address: str, username: str) -> None:
        with self._lock:
            self._failures.pop((address, username), None)
