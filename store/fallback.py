"""What reads fall back on when a service fails: breakers, and the last state loaded per scope."""

from __future__ import annotations

import time
from typing import Any

from store.errors import StoreUnavailable, describe
from store.events import log
from store.local import ScopeState

# Scopes remembered for outages; past this, expired ones are dropped.
MAX_LAST_KNOWN = 50_000


class Breaker:
    """After a failure, skip a service for ``pause`` seconds instead of waiting on every read."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.open_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self.open_until

    def trip(self) -> None:
        self.open_until = time.monotonic() + self.pause

    def reset(self) -> None:
        self.open_until = 0.0


class LastKnown:
    """The last state loaded per scope, kept across tasks and served only while PostgreSQL is
    down, for ``grace_period`` seconds. Changes this process hears move it forward; a change it
    cannot apply (a gap, a mark proving it older) forgets it: an outage never serves a state
    older than one this process heard of."""

    def __init__(self, grace_period: float = 300.0) -> None:
        self.grace_period = grace_period
        self._states: dict[str, tuple[float, ScopeState]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()

    def remember(self, scope: str, state: ScopeState) -> None:
        now = time.monotonic()
        if len(self._states) >= MAX_LAST_KNOWN:
            self._forget_expired(now)
        self._states[scope] = (now, state)

    def get(self, scope: str) -> ScopeState:
        return self._states[scope][1]

    def serve(self, scopes: list[str], error: BaseException) -> None:
        """Check that every scope has a copy young enough to serve, and log the fallback;
        raise StoreUnavailable, naming the first that has none."""
        now = time.monotonic()
        for scope in scopes:
            entry = self._states.get(scope)
            if entry is None or now - entry[0] > self.grace_period:
                raise StoreUnavailable(
                    f"cannot read {scope}: PostgreSQL is unavailable ({describe(error)}) and no "
                    f"value was loaded in the last {self.grace_period:.0f}s"
                ) from error
        for scope in scopes:
            log.warning(
                "cache.fallback",
                layer="postgres",
                to="last_known",
                scope=scope,
                age_s=round(now - self._states[scope][0], 3),
                error=describe(error),
            )

    def advance(
        self, scope: str, revision: int, sets: dict[str, Any], unsets: tuple[str, ...]
    ) -> None:
        """Move the copy of ``scope`` forward by one change, or forget it on a gap."""
        known = self._states.get(scope)
        if known is None or known[1].revision >= revision:
            return
        if known[1].revision != revision - 1:
            self._states.pop(scope, None)
            return
        values = dict(known[1].values)
        values.update(sets)
        for key in unsets:
            values.pop(key, None)
        self._states[scope] = (time.monotonic(), ScopeState(revision, values))

    def forget_older(self, scope: str, revision: int) -> None:
        known = self._states.get(scope)
        if known is not None and known[1].revision < revision:
            self._states.pop(scope, None)

    def _forget_expired(self, now: float) -> None:
        expired = [s for s, (at, _) in self._states.items() if now - at > self.grace_period]
        for scope in expired:
            self._states.pop(scope, None)
        if len(self._states) >= MAX_LAST_KNOWN:
            self._states.clear()  # still full: an outage now reads PostgreSQL or fails
