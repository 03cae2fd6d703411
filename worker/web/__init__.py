"""The operators' web console: browse, change, history and revert, fleet status (``optionstore
web``, or ``create_app()`` mounted into your own ASGI application)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["create_app"]


def create_app(**options: Any) -> Starlette:
    """The console's ASGI application; see ``worker.web.app.create_app`` for ``options``."""
    from worker.web.app import create_app as create

    return create(**options)
