"""Brute-force protection of password checks: per-user and per-address failure counters with exponential backoff.

Hand-written (a few dozen lines) because the libraries that exist either limit request *rates* (a token bucket
would still let a patient attacker guess forever at the allowed rate and cannot express "free after success") or
need a shared store such as Redis that this appliance does not have.

The counters live in this process's memory, not in the database: the user's API mapping says Login writes
nothing ("POST /auth/login → issues tokens only; no schema writes"), and a failed login is a Login call. So with
several OMA processes behind one address an attacker gets each process's allowance; the backoff still grows
exponentially on each of them. See docs/security/auth.md.

Rules (numbers from ``Settings``):

* Every attempt counts as a failure *when it starts* (before the slow password check), and a success takes its
  own attempt back. Parallel guesses therefore cannot all slip through before the first failure is recorded.
* The first ``free_failures`` attempts of a key are not delayed. Each further one locks the key for
  ``base * 2**(n-1)`` seconds (n = attempts beyond the free ones), at most ``max_backoff``.
* A locked key is refused without checking the password; the refusal does not extend the lock (so an attacker
  cannot keep the real user out forever, only for the current backoff).
* Keys: the user name as typed (known or not, so the answer never tells which users exist) and the caller's
  address (so spraying many names from one address is throttled too). A success resets the user's counter but
  only takes back its own attempt from the address (one valid account must not launder an address's guesses).
* A key whose last attempt is older than ``window`` is forgotten; at most ``max_tracked`` keys are kept (oldest
  dropped first), so spraying random names cannot grow memory without bound.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from oma_server.errors import ResourceExhausted


@dataclass
class _Counter:
    attempts: int = 0
    locked_until: float = 0.0
    last_attempt: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """One started password check: the keys it was counted against."""

    user_key: str
    peer_key: str


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures_per_user: int = 5
    free_failures_per_peer: int = 20
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 900.0
    window_seconds: float = 900.0
    max_tracked: int = 10_000


class LoginThrottle:
    def __init__(self, policy: ThrottlePolicy, clock: Callable[[], float] = time.monotonic):
        self._policy = policy
        self._clock = clock
        self._counters: OrderedDict[str, _Counter] = OrderedDict()
        self._lock = threading.Lock()

    def begin(self, username: str, peer: str) -> Attempt:
        """Count an attempt for ``username`` from ``peer`` or refuse it (ResourceExhausted with the delay)."""
        attempt = Attempt(user_key=f"user:{username}", peer_key=f"peer:{peer}")
        now = self._clock()
        with self._lock:
            user, address = self._counter(attempt.user_key, now), self._counter(attempt.peer_key, now)
            wait = max(user.locked_until, address.locked_until) - now
            if wait > 0:
                retry_after = math.ceil(wait * 10) / 10  # whole tenths: a client waiting that long is let in
                raise ResourceExhausted(
                    f"too many failed logins for this user or from this address; try again in {retry_after:g} s",
                    retry_after)
            self._count(user, now, self._policy.free_failures_per_user)
            self._count(address, now, self._policy.free_failures_per_peer)
        return attempt

    def succeeded(self, attempt: Attempt) -> None:
        with self._lock:
            self._counters.pop(attempt.user_key, None)
            address = self._counters.get(attempt.peer_key)
            if address is not None and address.attempts > 0:
                address.attempts -= 1

    def failures(self, username: str) -> int:
        """Attempts of ``username`` not yet taken back by a success (for the log line of a failure)."""
        with self._lock:
            counter = self._counters.get(f"user:{username}")
            return counter.attempts if counter else 0

    def _counter(self, key: str, now: float) -> _Counter:
        counter = self._counters.get(key)
        if counter is None or (now - counter.last_attempt > self._policy.window_seconds
                               and now >= counter.locked_until):
            counter = _Counter()
            self._counters[key] = counter
        self._counters.move_to_end(key)
        while len(self._counters) > self._policy.max_tracked:
            self._counters.popitem(last=False)
        return counter

    def _count(self, counter: _Counter, now: float, free: int) -> None:
        counter.attempts += 1
        counter.last_attempt = now
        beyond = counter.attempts - free
        if beyond > 0:
            delay = min(self._policy.backoff_max_seconds, self._policy.backoff_base_seconds * 2 ** min(beyond - 1, 60))
            counter.locked_until = max(counter.locked_until, now + delay)
