"""The console's users file: names, roles and argon2 password hashes, written whole and atomically,
readable by its owner only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from store.errors import InvalidOption

VIEWER, EDITOR = "viewer", "editor"
ROLES = (VIEWER, EDITOR)
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
# A users file larger than this is not one we wrote.
MAX_FILE_BYTES = 1024 * 1024

_HASHER = PasswordHasher()


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    # Changes with the password: a session made before a passwd (or a remove and add) no longer
    # matches, so it is signed out.
    stamp: str = ""

    @property
    def can_write(self) -> bool:
        return self.role == EDITOR


def check_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise InvalidOption("name", "must be 1 to 64 letters, digits or the characters _ . @ -")
    return name


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidOption("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return str(role)


def check_password(password: object) -> str:
    if not isinstance(password, str):
        raise InvalidOption("password", "must be a string")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidOption(
            "password", f"must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        )
    return password


class UsersFile:
    """The users of one console, in a JSON file: ``{"users": {name: {"role", "hash"}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dummy: str | None = None

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        if len(raw) > MAX_FILE_BYTES:
            raise InvalidOption("users file", f"{self.path} is larger than {MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(raw)
            users = data["users"]
            return {
                check_name(name): {"role": check_role(e["role"]), "hash": str(e["hash"])}
                for name, e in users.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidOption("users file", f"{self.path} is not a users file ({exc})") from None

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(f"{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as out:
                json.dump({"users": users}, out, indent=2, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(scratch, self.path)
        finally:
            scratch.unlink(missing_ok=True)

    def users(self) -> list[User]:
        return [_user(name, entry) for name, entry in sorted(self._read().items())]

    def get(self, name: str) -> User | None:
        entry = self._read().get(name)
        return None if entry is None else _user(name, entry)

    def add(self, name: str, role: str, password: str) -> User:
        users = self._read()
        check_name(name)
        if name in users:
            raise InvalidOption("name", f"{name!r} exists already (passwd changes a password)")
        users[name] = {"role": check_role(role), "hash": _HASHER.hash(check_password(password))}
        self._write(users)
        return _user(name, users[name])

    def remove(self, name: str) -> None:
        users = self._read()
        if users.pop(name, None) is None:
            raise InvalidOption("name", f"no user {name!r}")
        self._write(users)

    def passwd(self, name: str, password: str) -> None:
        users = self._read()
        if name not in users:
            raise InvalidOption("name", f"no user {name!r}")
        users[name]["hash"] = _HASHER.hash(check_password(password))
        self._write(users)

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None (in about the same time either way)."""
        entry = self._read().get(name)
        if len(password) > MAX_PASSWORD_CHARS:
            return None
        if entry is None:
            # An unknown name costs as much time as a wrong password: a timing does not tell
            # which names exist.
            if self._dummy is None:
                self._dummy = _HASHER.hash(secrets.token_hex(16))
            with contextlib.suppress(VerificationError):
                _HASHER.verify(self._dummy, password)
            return None
        try:
            _HASHER.verify(entry["hash"], password)
        except (VerificationError, InvalidHashError):
            return None
        return _user(name, entry)


def _user(name: str, entry: dict[str, str]) -> User:
    stamp = hashlib.sha256(entry["hash"].encode()).hexdigest()[:16]
    return User(name, entry["role"], stamp)
