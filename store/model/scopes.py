"""Scopes: which set of options a key belongs to, and their canonical names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from store.errors import InvalidOption
from store.model.validation import validate_id

# Kinds in the order SPEC lists them; the canonical text of each is fixed by the contract.
GLOBAL = "global"
PROJECT = "project"
USER = "user"
GROUP = "group"
TAGKEYS = "tagkeys"

_ID = r"([0-9]{1,19})"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (GLOBAL, re.compile(r"global")),
    (PROJECT, re.compile(rf"project:{_ID}")),
    (USER, re.compile(rf"user:{_ID}(?:/project:{_ID})?")),
    (GROUP, re.compile(rf"group:{_ID}")),
    (TAGKEYS, re.compile(rf"tagkeys:{_ID}")),
)


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of options: ``global``, ``project:42``, ``user:7/project:42``, ``group:9``..."""

    kind: str
    id: int | None = None
    project_id: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _canonical(self.kind, self.id, self.project_id))

    def __str__(self) -> str:
        return self.name

    @property
    def is_tag_keys(self) -> bool:
        return self.kind == TAGKEYS

    @classmethod
    def parse(cls, text: object, *, field: str = "scope") -> Scope:
        """Read a canonical scope name, rejecting anything else with an error naming ``field``."""
        if not isinstance(text, str):
            raise InvalidOption(field, f"must be a scope name string, not {type(text).__name__}")
        for kind, pattern in _PATTERNS:
            match = pattern.fullmatch(text)
            if match is None:
                continue
            ids = [None if g is None else validate_id(int(g), field) for g in match.groups()]
            ids += [None] * (2 - len(ids))
            scope = cls(kind, ids[0], ids[1])
            if scope.name != text:  # leading zeros: only one spelling per scope
                raise InvalidOption(field, f"{text!r} is not canonical; write {scope.name!r}")
            return scope
        raise InvalidOption(
            field,
            f"{text!r} is not a scope; expected global, project:ID, user:ID, "
            "user:ID/project:ID, group:ID or tagkeys:ID",
        )


def _canonical(kind: str, ident: int | None, project_id: int | None) -> str:
    if kind == GLOBAL:
        return GLOBAL
    if kind == USER and project_id is not None:
        return f"user:{ident}/project:{project_id}"
    return f"{kind}:{ident}"


def global_scope() -> Scope:
    return Scope(GLOBAL)


def project_scope(project_id: object, *, field: str = "project_id") -> Scope:
    return Scope(PROJECT, validate_id(project_id, field))


def user_scope(user_id: object, project_id: object) -> Scope:
    pid = None if project_id is None else validate_id(project_id, "project_id")
    return Scope(USER, validate_id(user_id, "user_id"), pid)


def group_scope(group_id: object) -> Scope:
    return Scope(GROUP, validate_id(group_id, "group_id"))


def tag_keys_scope(project_id: object) -> Scope:
    return Scope(TAGKEYS, validate_id(project_id, "project_id"))
