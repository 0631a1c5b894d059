"""Password guessing, slowed down: failed logins are counted per user name and per client address over
the last `WINDOW_SECONDS`; at the limit, further attempts are refused without looking at the password
until the oldest failure ages out. A good login clears its name's count."""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

WINDOW_SECONDS = 900.0
PER_NAME = 5  # one account guessed at
PER_ADDRESS = 20  # one machine guessing many names (several users may share a reading-room PC)


class LoginThrottle:
    def __init__(self, per_name: int = PER_NAME, per_address: int = PER_ADDRESS,
                 window_seconds: float = WINDOW_SECONDS) -> None:
        self.limits = {"name": per_name, "address": per_address}
        self.window = window_seconds
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def blocked(self, name: str, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return (len(self._recent(("name", name), now)) >= self.limits["name"]
                    or len(self._recent(("address", address), now)) >= self.limits["address"])

    def failed(self, name: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (("name", name), ("address", address)):
                self._recent(key, now).append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(("name", name), None)
