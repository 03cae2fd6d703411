"""A user's own project, as a team would write it: its own Celery app made an optionstore app
with ``worker.install(app)``, and a task that reads options."""
