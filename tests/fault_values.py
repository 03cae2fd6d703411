"""What the fault-injection modules loaded into test workers (``--include``) look for in a
reload message: a value set with a prefix of theirs."""

from __future__ import annotations

import base64
import json


def sets_value_starting(prefix: str, message: str) -> bool:
    """Whether a reload message (its JSON text, or kombu's message on Redis around it) sets a
    string value that starts with ``prefix``."""
    body = json.loads(message)
    if "body" in body and "properties" in body:
        body = json.loads(base64.b64decode(body["body"]))
    values = body.get("set") or {}
    return any(isinstance(v, str) and v.startswith(prefix) for v in values.values())
