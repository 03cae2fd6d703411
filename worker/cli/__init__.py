"""The ``optionstore`` command line."""

from worker.cli.commands import main

__all__ = ["main"]
