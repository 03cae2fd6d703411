"""What each worker process has applied, kept in Redis with an expiry, and who has converged."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
import redis

from store.model.writes import WriteResult
from store.redis import direct
from store.redis.cluster import RedisClient

REVISION_PREFIX = "r:"
# A host's report (store/broadcast/relay.py): one hash per worker main process that relays to
# its children, with each child's fields under "p:<pid>" and its revisions under
# "c:<pid>:<scope>"; ``processes`` lists every child of it as a process of its own.
RELAY_FIELD = "relay"
CHILD_PREFIX = "p:"
CHILD_REVISION_PREFIX = "c:"
_REPORT = resources.files("store.redis").joinpath("report.lua").read_text(encoding="utf-8")
_REPORT_SHA = hashlib.sha1(_REPORT.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class ProcessReport:
    """One live process as it last reported itself."""

    hostname: str
    pid: int
    kind: str  # "worker", or "web" for any other process that reads (a web server, a script)
    pool: str
    mode: str
    synced: bool
    synced_at: float
    heard_at: float
    reported_at: float
    messages: int
    # Reads sent past the local cache, to Redis and to PostgreSQL.
    redis_reads: int = 0
    postgres_reads: int = 0
    revisions: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.hostname}:{self.pid}"

    def has_applied(self, scope: str, revision: int, committed_at: float, announced: bool) -> bool:
        """True if this process will never serve ``scope`` older than ``revision``."""
        if self.revisions.get(scope, 0) >= revision:
            return True
        # Subscribed after the change was committed and announced: it cached nothing older.
        return self.synced and announced and self.synced_at > committed_at


def lagging(
    reports: Iterable[ProcessReport], writes: Iterable[tuple[WriteResult, bool]]
) -> dict[str, list[str]]:
    """For each process, the ``scope@revision`` of the given writes it has not applied."""
    writes = list(writes)
    behind: dict[str, list[str]] = {}
    for report in reports:
        missing = [
            f"{w.scope}@{w.revision}"
            for w, announced in writes
            if not report.has_applied(w.scope, w.revision, w.committed_at, announced)
        ]
        behind[report.name] = missing
    return behind


class Presence:
    """Process reports under ``<namespace>:proc:<hostname>:<pid>``, expiring unless refreshed."""

    def __init__(self, client: RedisClient, *, namespace: str, ttl: float = 15.0) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl = ttl

    def key(self, hostname: str, pid: int) -> str:
        return f"{self.namespace}:proc:{hostname}:{pid}"

    def report(
        self,
        *,
        hostname: str,
        pid: int,
        fields: dict[str, Any],
        revisions: dict[str, int],
        forgotten: Iterable[str] = (),
    ) -> bool:
        """Write a report; True if the hash was (re)created and so lacks earlier revisions."""
        key = self.key(hostname, pid)
        stale = [REVISION_PREFIX + scope for scope in forgotten]
        args: list[Any] = [int(self.ttl * 1000), len(stale), *stale]
        for name, value in fields.items():
            args += (name, orjson.dumps(value))
        args += ("reported_at", orjson.dumps(time.time()))
        for scope, revision in revisions.items():
            args += (REVISION_PREFIX + scope, revision)
        # HSET answers how many fields were new: "reported_at" is new only in a fresh hash
        # (first report, or Redis lost it), whose revisions must then be sent again in full.
        added = self._run_report(key, args)
        return bool(added) and added >= len(fields) + 1 + len(revisions)

    def report_host(
        self,
        *,
        hostname: str,
        pid: int,
        children: dict[int, dict[str, Any]],
        revisions: dict[int, dict[str, int]],
        deleted: Iterable[str] = (),
    ) -> bool:
        """Write a host's report (the children's fields and revisions since the last one, and
        the fields of those that left or forgot a scope deleted); True if the hash was
        (re)created and so lacks what earlier reports carried."""
        key = self.key(hostname, pid)
        stale = list(deleted)
        args: list[Any] = [int(self.ttl * 1000), len(stale), *stale]
        args += (RELAY_FIELD, b"true", "hostname", orjson.dumps(hostname), "pid", pid)
        args += ("reported_at", orjson.dumps(time.time()))
        sent = 4
        for child, fields in children.items():
            args += (f"{CHILD_PREFIX}{child}", orjson.dumps(fields))
            sent += 1
        for child, scopes in revisions.items():
            for scope, revision in scopes.items():
                args += (f"{CHILD_REVISION_PREFIX}{child}:{scope}", revision)
                sent += 1
        return self._run_report(key, args) >= sent

    def remove_child(self, hostname: str, pid: int, child: int) -> None:
        """Take a child out of its host's report (it reports for itself from now on)."""
        self.client.hdel(self.key(hostname, pid), f"{CHILD_PREFIX}{child}")

    def _run_report(self, key: str, args: list[Any]) -> int:
        # By its digest, on a pooled connection (store/redis/direct.py): a report follows every
        # change in every process of a fleet. NOSCRIPT (a new or restarted server): loaded,
        # then run.
        try:
            return int(direct.execute(self.client, "EVALSHA", _REPORT_SHA, 1, key, *args))
        except redis.exceptions.NoScriptError:
            self.client.script_load(_REPORT)
            return int(direct.execute(self.client, "EVALSHA", _REPORT_SHA, 1, key, *args))

    def remove(self, hostname: str, pid: int) -> None:
        self.client.delete(self.key(hostname, pid))

    def processes(self) -> list[ProcessReport]:
        keys = sorted(self.client.scan_iter(match=f"{self.namespace}:proc:*", count=500))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        reports: list[ProcessReport] = []
        for raw in pipe.execute():
            if not raw:  # expired between the scan and the read
                continue
            if RELAY_FIELD.encode() in raw:
                reports += _parse_host(raw)
            else:
                reports.append(_parse(raw))
        return reports


def _parse_host(raw: dict[bytes, bytes]) -> list[ProcessReport]:
    """Every child a host's report lists, each as the process report it would have written."""
    host: dict[str, Any] = {}
    children: dict[str, dict[str, Any]] = {}
    revisions: dict[str, dict[str, int]] = {}
    for name_bytes, value in raw.items():
        name = name_bytes.decode()
        if name.startswith(CHILD_PREFIX):
            children[name[len(CHILD_PREFIX) :]] = json.loads(value)
        elif name.startswith(CHILD_REVISION_PREFIX):
            child, _, scope = name[len(CHILD_REVISION_PREFIX) :].partition(":")
            revisions.setdefault(child, {})[scope] = int(value)
        else:
            host[name] = json.loads(value)
    return [
        _report(
            {
                **fields,
                "hostname": host.get("hostname", "?"),
                "pid": child,
                "reported_at": host.get("reported_at", 0.0),
            },
            revisions.get(child, {}),
        )
        for child, fields in sorted(children.items())
    ]


def _parse(raw: dict[bytes, bytes]) -> ProcessReport:
    fields: dict[str, Any] = {}
    revisions: dict[str, int] = {}
    for name_bytes, value in raw.items():
        name = name_bytes.decode()
        if name.startswith(REVISION_PREFIX):
            revisions[name[len(REVISION_PREFIX) :]] = int(value)
        else:
            fields[name] = json.loads(value)
    return _report(fields, revisions)


def _report(fields: dict[str, Any], revisions: dict[str, int]) -> ProcessReport:
    return ProcessReport(
        hostname=str(fields.get("hostname", "?")),
        pid=int(fields.get("pid", 0)),
        kind=str(fields.get("kind", "worker")),
        pool=str(fields.get("pool", "?")),
        mode=str(fields.get("mode", "?")),
        synced=bool(fields.get("synced", False)),
        synced_at=float(fields.get("synced_at", 0.0)),
        heard_at=float(fields.get("heard_at", 0.0)),
        reported_at=float(fields.get("reported_at", 0.0)),
        messages=int(fields.get("messages", 0)),
        redis_reads=int(fields.get("redis_reads", 0)),
        postgres_reads=int(fields.get("postgres_reads", 0)),
        revisions=revisions,
    )
