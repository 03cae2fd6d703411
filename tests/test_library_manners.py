"""The library as a guest in its host process: nothing on stdout, the host's structlog or logging
setup kept and used, and a first use on an unmigrated database that says what to run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest

import store
from store.model.scopes import project_scope
from store.model.writes import set_write
from store.options_store import OptionsStore
from store.postgres.store import PostgresStore
from store.readers import ProjectOptions
from tests.conftest import ROOT, Services, fresh_database, fresh_id
from tests.processes import log_events


def _run(services: Services, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=services.env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _stored(backend: Any, value: Any) -> int:
    """A new project with option ``k`` set to ``value``."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", value), task_id=f"test-{uuid.uuid4()}")
    return project


def test_a_plain_script_has_only_its_own_line_on_stdout(backend: Any, services: Services) -> None:
    """A script that imports store and reads an option prints exactly its own line on stdout;
    the store's events (store.configured) go to stderr."""
    project = _stored(backend, {"on": True})
    done = _run(
        services,
        f"""
        import json, store
        print(json.dumps(store.project_options.get_value({project}, "k")))
        """,
    )
    assert done.stdout == '{"on": true}\n'
    assert [e["source"] for e in log_events(done.stderr, "store.configured")] == ["environment"]


def test_options_log_level_applies_when_the_host_configured_nothing(
    backend: Any, services: Services
) -> None:
    """With OPTIONS_LOG_LEVEL=warning and no host setup, info events are not written at all."""
    project = _stored(backend, 1)
    done = _run(
        services,
        f"""
        import store
        print(store.project_options.get_value({project}, "k"))
        """,
        OPTIONS_LOG_LEVEL="warning",
    )
    assert done.stdout == "1\n"
    assert log_events(done.stderr, "store.configured") == []


def test_a_host_structlog_configuration_is_kept_and_receives_our_events(
    backend: Any, services: Services
) -> None:
    """A host that configured structlog keeps its configuration through import and a read, and
    our events go through its processors, not to stdout or stderr."""
    project = _stored(backend, "v")
    done = _run(
        services,
        f"""
        import json, structlog
        seen = []
        def keep(logger, method_name, event_dict):
            seen.append(event_dict["event"])
            raise structlog.DropEvent
        structlog.configure(processors=[keep])
        before = structlog.get_config()
        import store
        value = store.project_options.get_value({project}, "k")
        kept = structlog.get_config() == before
        print(json.dumps({{"value": value, "kept": kept, "seen": seen}}))
        """,
    )
    report = json.loads(done.stdout)
    assert report["value"] == "v"
    assert report["kept"] is True
    assert "store.configured" in report["seen"]
    assert log_events(done.stderr) == []


def test_a_host_logging_setup_receives_our_events(backend: Any, services: Services) -> None:
    """A host that configured only stdlib logging gets our events as records of logger
    optionstore, and structlog stays unconfigured."""
    project = _stored(backend, 2)
    done = _run(
        services,
        f"""
        import logging, sys
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="HOST %(name)s %(levelname)s %(message)s"
        )
        import structlog, store
        print(store.project_options.get_value({project}, "k"), structlog.is_configured())
        """,
        OPTIONS_LOG_LEVEL="info",
    )
    assert done.stdout == "2 False\n"
    assert "HOST optionstore INFO store.configured source=environment kind=web" in done.stderr
    assert log_events(done.stderr) == []


def test_installing_a_user_app_never_configures_structlog(services: Services) -> None:
    """worker.install(user_app) leaves structlog alone when the user's worker starts; only the
    project's own worker app configures it."""
    done = _run(
        services,
        """
        import json, types, structlog
        from celery import Celery
        from celery.concurrency.solo import TaskPool
        import worker
        from worker.steps import StoreStep
        calls = []
        configure = structlog.configure
        structlog.configure = lambda **kw: (calls.append(kw), configure(**kw))
        user_app = Celery("userapp", set_as_current=False)
        worker.install(user_app)
        StoreStep(types.SimpleNamespace(pool_cls=TaskPool, app=user_app))
        user = len(calls)
        StoreStep(types.SimpleNamespace(pool_cls=TaskPool, app=worker.app))
        print(json.dumps({"user": user, "project": len(calls)}))
        """,
    )
    assert json.loads(done.stdout) == {"user": 0, "project": 1}


def test_a_read_on_an_unmigrated_database_says_to_migrate(services: Services) -> None:
    """A read, and a write, on a database never migrated raise NotMigrated naming the
    `optionstore migrate` command instead of psycopg's UndefinedTable."""
    with fresh_database(services, "bare", migrated=False) as url:
        layered = OptionsStore()
        layered.configure(postgres=PostgresStore(conninfo=url), redis_cache=None)
        try:
            with pytest.raises(store.NotMigrated, match="run `optionstore migrate`"):
                ProjectOptions(layered).get_value(fresh_id(), "k")
            with pytest.raises(store.NotMigrated, match="has no optionstore schema"):
                layered.commit(set_write(project_scope(fresh_id()), "k", 1))
        finally:
            layered.db.close()
    assert issubclass(store.NotMigrated, store.MigrationError)
