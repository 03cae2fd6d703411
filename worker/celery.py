"""The project's own Celery app, ``worker.app``: ``celery -A worker worker`` runs it."""

from __future__ import annotations

from celery import Celery

from worker.install import Installation

# Not made the current app: a user's app in the same process stays theirs. Its configuration
# (celeryconfig) is read when Celery first needs it, not here.
app = Celery("optionstore", set_as_current=False)
app.config_from_object("celeryconfig")
# The environment configures a process that only reads; this app is not its provider.
app.optionstore = Installation(app, provide=False, logging=True).install()
