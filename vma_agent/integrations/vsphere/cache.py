"""Logins shared between RPCs (:class:`SessionCache`)."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from vma_agent import errors
from vma_agent.integrations.vsphere.session import Session, connect
from vma_agent.integrations.vsphere.types import VCenterParams


class SessionCache:
    """Logins shared between RPCs: one session per (host, user, TLS mode, password hash).

    Sessions idle longer than ``idle_seconds`` are logged out; a session whose vCenter became
    unreachable is dropped so the next call starts afresh."""

    def __init__(self, idle_seconds: float = 600.0, max_sessions: int = 32,
                 factory: Callable[[VCenterParams], Session] = connect):
        self._idle = idle_seconds
        self._max = max_sessions
        self._factory = factory
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, ...], Session] = {}
        self._key_locks: dict[tuple[str, ...], threading.Lock] = {}
        self.logins = 0

    def _evict(self) -> list[Session]:
        now = time.monotonic()
        old = [k for k, s in self._sessions.items() if s.closed or now - s.last_used > self._idle]
        while len(self._sessions) - len(old) >= self._max:
            rest = sorted((s.last_used, k) for k, s in self._sessions.items() if k not in old)
            old.append(rest[0][1])
        for k in old:
            self._key_locks.pop(k, None)
        return [self._sessions.pop(k) for k in old]

    def get(self, params: VCenterParams) -> Session:
        key = params.cache_key()
        with self._lock:
            stale = self._evict()
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        for s in stale:
            s.close()
        with key_lock:
            with self._lock:
                session = self._sessions.get(key)
            if session is not None and not session.closed:
                session.last_used = time.monotonic()
                return session
            try:
                session = self._factory(params)
            except BaseException:
                with self._lock:
                    if key not in self._sessions:
                        self._key_locks.pop(key, None)  # no entry per failed (e.g. wrong) password
                raise
            with self._lock:
                self.logins += 1
                existing = self._sessions.get(key)
                if existing is None or existing.closed:
                    self._sessions[key] = session
                    return session
            session.close()  # raced with another login for the same key: keep the first
            return existing

    @contextlib.contextmanager
    def session(self, params: VCenterParams) -> Iterator[Session]:
        s = self.get(params)
        try:
            yield s
        except errors.Unavailable:
            self.discard(s, logout=False)
            raise
        except errors.Unauthenticated:
            self.discard(s, logout=False)
            raise

    def discard(self, session: Session, logout: bool = True) -> None:
        with self._lock:
            for k, s in list(self._sessions.items()):
                if s is session:
                    del self._sessions[k]
        session.close(logout=logout)

    def stop(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    def __len__(self) -> int:
        return len(self._sessions)
