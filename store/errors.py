"""The exception hierarchy: one root, a subclass per kind of failure."""

from __future__ import annotations


class OptionsError(Exception):
    """Root of every error optionstore raises."""


class InvalidOption(OptionsError, ValueError):
    """A write or a scope failed an input rule; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        # Both in args: Celery ships an exception as its args (JSON) and rebuilds it from them.
        super().__init__(field, message)
        self.field = field
        self.reason = message

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class SignatureRefused(InvalidOption):
    """A worker that holds a signing key refused a write task it could not verify (no
    signature, an unknown key, or a task altered after signing): nothing was written."""


class RevisionConflict(OptionsError):
    """A write named an ``expected_revision`` its scope is not at: nothing was written."""

    def __init__(self, scope: str, expected: int, current: int) -> None:
        # All in args: Celery ships an exception as its args (JSON) and rebuilds it from them.
        super().__init__(scope, expected, current)
        self.scope = scope
        self.expected = expected
        self.current = current

    def __str__(self) -> str:
        return (
            f"expected_revision: {self.scope} is at revision {self.current}, "
            f"not {self.expected}; nothing was written"
        )


class NotConfigured(OptionsError):
    """The store was used before ``store.configure()`` told it where its services are."""


class StoreUnavailable(OptionsError):
    """Neither a cache nor PostgreSQL could answer; transient, worth a retry."""


class MigrationError(OptionsError):
    """The database schema is missing, newer than this code, or could not be upgraded."""


class NotMigrated(MigrationError):
    """The database schema is missing or older than this code: run ``optionstore migrate``."""


def describe(exc: BaseException) -> str:
    """An exception in one line, for a log event."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class InvalidToken(InvalidOption):
    """A task's ``options_after`` token (a write's revision per scope) is malformed or too
    large; ``field`` names the header, and the scope when one entry is at fault."""
