"""A tiny WSGI app that reads an option per request, for the web-process tests (gunicorn).

It has no request hook and calls no configure(): the store configures itself from the
environment on first use. It reads once at import, so under ``--preload`` the master process
has configured the store and started its consumer before it forks the workers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import store

WARM = store.options.get_value("webapp:warm")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    project, key = int(query["project"][0]), query["key"][0]
    value = store.project_options.get_value(project, key)
    time.sleep(float(query.get("hold", ["0"])[0]))
    body = json.dumps({"pid": os.getpid(), "value": value}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
