"""The exception hierarchy: one root, a subclass per kind of failure."""

from __future__ import annotations


class OptionsError(Exception):
    """Root of every error optionstore raises."""


class InvalidOption(OptionsError, ValueError):
    """A write or a scope failed an input rule; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self) -> tuple[type[InvalidOption], tuple[str, str]]:
        # Celery rebuilds exceptions from their args; keep (field, message) round-trippable.
        return (type(self), (self.field, self.reason))


class NotConfigured(OptionsError):
    """The store was used before ``store.configure()`` told it where its services are."""


class StoreUnavailable(OptionsError):
    """Neither a cache nor PostgreSQL could answer; transient, worth a retry."""


class MigrationError(OptionsError):
    """The database schema is missing, newer than this code, or could not be upgraded."""
