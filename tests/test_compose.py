"""docker-compose.yml speaks the same environment names as the code, and its worker scales."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {
    "OPTIONS_DATABASE_URL",
    "OPTIONS_REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "OPTIONS_LOCAL_CACHE",
}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def names_read_by_the_code() -> set[str]:
    source = (ROOT / "store" / "settings.py").read_text()
    return set(re.findall(r"""["']((?:OPTIONS|CELERY)_[A-Z_]+)["']""", source))


def test_every_contract_name_is_read_by_the_code() -> None:
    """Settings.from_environ reads each of the contract's environment names."""
    assert names_read_by_the_code() >= CONTRACT


def test_compose_services_pass_only_names_the_code_reads() -> None:
    """Compose sets every contract name, and no OPTIONS_/CELERY_ name the code does not read."""
    services = compose()["services"]
    known = names_read_by_the_code()
    for name in ("migrate", "worker"):
        env = services[name]["environment"]
        assert set(env) >= CONTRACT, name
        unknown = {k for k in env if k.startswith(("OPTIONS_", "CELERY_"))} - known
        assert not unknown, f"{name} sets {unknown}, which no code reads"


def test_compose_has_the_services_with_health_checks() -> None:
    """postgres, redis and worker have health checks; the worker waits for healthy services."""
    services = compose()["services"]
    for name in ("postgres", "redis", "rabbitmq", "worker"):
        assert "healthcheck" in services[name], name
    depends = services["worker"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_worker_service_can_scale() -> None:
    """The worker has no container_name and no host ports, so --scale worker=N starts N."""
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["command"][:4] == ["celery", "-A", "worker", "worker"]
