"""A WSGI app for the benchmark's gunicorn workers: ``/warm`` reads the benchmark's option,
``/hit`` times local hits inside the worker. No configure() call and no request hook: the store
configures itself from the environment. It reads at import, so under ``--preload`` the master
has configured the store and started a consumer before it forks."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import store
from bench.hit import time_hits
from worker.logging import configure_logging

# Down to debug: the benchmark reads broadcast.applied.
configure_logging(log_format="json", level=logging.DEBUG)
WARM = store.options.get_value("bench:warm")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    project, key = int(query["project"]), query["key"]
    if environ.get("PATH_INFO") == "/hit":
        values = json.loads(query["values"])
        answer = time_hits(project, key, values, int(query["number"]), int(query["reps"]))
    else:
        time.sleep(float(query.get("hold", "0")))  # keeps this worker busy: the next goes elsewhere
        answer = {
            "value": store.project_options.get_value(project, key),
            "synced": store.backend.local.synced,
        }
    body = json.dumps({"pid": os.getpid(), **answer}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
