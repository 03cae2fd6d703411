"""Declared options: each key's scope kinds, JSON schema, default and flags, and the policy built
on them (writes checked, undeclared reads noted, declared defaults)."""

from __future__ import annotations

import json
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.errors import InvalidOption
from store.events import log
from store.fork import after_fork_in_child
from store.model.jsonschema import check_schema, check_value, schema_summary
from store.model.scopes import GLOBAL, GROUP, PROJECT, USER, Scope
from store.model.validation import encode_value, validate_key
from store.model.writes import Write

OPTION_KINDS = (GLOBAL, PROJECT, USER, GROUP)  # tag keys are a set, not declared options
_FIELDS = {
    "scopes",
    "schema",
    "default",
    "description",
    "read_only",
    "deprecated",
    "reason_required",
}
_SCHEMA_SHORTHAND = {"type", "enum", "minimum", "maximum", "maxLength", "items"}
_NO_DEFAULT = object()


@dataclass(frozen=True, slots=True)
class Declaration:
    """One declared option. ``default`` is meaningful only when ``has_default``."""

    key: str
    scopes: tuple[str, ...] = OPTION_KINDS
    schema: Mapping[str, Any] = field(default_factory=dict)
    default: Any = None
    has_default: bool = False
    description: str = ""
    read_only: bool = False
    deprecated: bool = False
    # The console asks for a reason with every change of this option (worker/web).
    reason_required: bool = False

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "key": self.key,
            "scopes": list(self.scopes),
            "schema": dict(self.schema),
            "type": schema_summary(self.schema),
            "description": self.description,
            "read_only": self.read_only,
            "deprecated": self.deprecated,
            "reason_required": self.reason_required,
        }
        if self.has_default:
            data["default"] = self.default
        return data


def declaration(
    key: str,
    *,
    scopes: Iterable[str] = OPTION_KINDS,
    schema: Mapping[str, Any] | None = None,
    default: Any = _NO_DEFAULT,
    description: str = "",
    read_only: bool = False,
    deprecated: bool = False,
    reason_required: bool = False,
    field_name: str = "key",
) -> Declaration:
    """A checked ``Declaration``: a valid key, known scope kinds, a valid schema, and a default
    that satisfies it."""
    validate_key(key, field_name)
    kinds = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    for kind in kinds:
        if kind not in OPTION_KINDS:
            raise InvalidOption(f"{field_name}.scopes", f"{kind!r} is not one of {OPTION_KINDS}")
    if not kinds:
        raise InvalidOption(f"{field_name}.scopes", "must name at least one scope kind")
    schema = dict(schema or {})
    check_schema(schema, f"{field_name}.schema")
    has_default = default is not _NO_DEFAULT
    if has_default:
        encode_value(default, f"{field_name}.default")
        check_value(schema, default, f"{field_name}.default")
    return Declaration(
        key,
        kinds,
        schema,
        default if has_default else None,
        has_default,
        str(description),
        bool(read_only),
        bool(deprecated),
        bool(reason_required),
    )


def parse_registry(data: Mapping[str, Any], *, source: str) -> tuple[list[Declaration], bool]:
    """Declarations and the strict setting from a loaded file (``[options."key"]`` tables)."""
    unknown = set(data) - {"strict", "options"}
    if unknown:
        raise InvalidOption(source, f"unknown top-level setting(s): {', '.join(sorted(unknown))}")
    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise InvalidOption(f"{source}: strict", "must be true or false")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise InvalidOption(f"{source}: options", "must be a table of key -> declaration")
    found = []
    for key, spec in options.items():
        where = f"{source}: options.{key!r}"
        if not isinstance(spec, dict):
            raise InvalidOption(where, "must be a table")
        extra = set(spec) - _FIELDS - _SCHEMA_SHORTHAND
        if extra:
            raise InvalidOption(where, f"unknown field(s): {', '.join(sorted(extra))}")
        schema = dict(spec.get("schema", {}))
        schema.update({k: v for k, v in spec.items() if k in _SCHEMA_SHORTHAND})
        found.append(
            declaration(
                key,
                scopes=spec.get("scopes", OPTION_KINDS),
                schema=schema,
                default=spec.get("default", _NO_DEFAULT),
                description=spec.get("description", ""),
                read_only=spec.get("read_only", False),
                deprecated=spec.get("deprecated", False),
                reason_required=spec.get("reason_required", False),
                field_name=where,
            )
        )
    return found, strict


def load_registry_file(path: Path) -> tuple[list[Declaration], bool]:
    """Read a registry file: TOML (canonical), or JSON for a ``.json`` name."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidOption("OPTIONS_REGISTRY", f"cannot read {source}: {exc.strerror}") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidOption("OPTIONS_REGISTRY", f"{source} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidOption("OPTIONS_REGISTRY", f"{source} must hold a table at the top")
    return parse_registry(data, source=source)


class Registry:
    """This process's declarations. Empty and not strict unless declared in code or loaded from
    a file (``resolve``, given by the store's owner, reads ``OPTIONS_REGISTRY``): then nothing is
    refused and nothing is logged, exactly as without a registry."""

    def __init__(self, *, resolve: Callable[[Registry], None] | None = None) -> None:
        # Called once, on first use, to load what this process's settings declare.
        self._resolve = resolve
        self._declared: dict[str, Declaration] = {}
        self._file_strict = False
        self.strict_override: bool | None = None
        self.source: str | None = None
        self._resolved = False
        self._noted: set[tuple[str, str]] = set()
        # kind -> {key: declared default}, for the local cache's reads (LocalCache): changed
        # in place, never replaced, and each change told to ``on_change``'s listeners.
        self.defaults: dict[str, dict[str, Any]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        after_fork_in_child(self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change of the declarations (and of ``defaults``)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        defaults: dict[str, dict[str, Any]] = {}
        for found in self._declared.values():
            if found.has_default:
                for kind in found.scopes:
                    defaults.setdefault(kind, {})[found.key] = found.default
        self.defaults.clear()
        self.defaults.update(defaults)
        for listener in self._listeners:
            listener()

    # -- declaring ---------------------------------------------------------------------------

    def declare(self, key: str, **spec: Any) -> Declaration:
        """Declare (or redeclare) ``key``; keyword arguments as in ``declaration()``."""
        found = declaration(key, **spec)
        self._declared[key] = found
        self._changed()
        return found

    def load(self, path: str | Path, *, strict: bool | None = None) -> None:
        """Add the declarations of a registry file; ``strict`` (the environment's) beats the
        file's own setting."""
        declarations, file_strict = load_registry_file(Path(path))
        for found in declarations:
            self._declared[found.key] = found
        self._file_strict = file_strict
        self.strict_override = strict
        self.source = str(path)
        self._changed()

    def reset(self) -> None:
        """Forget every declaration and setting (and resolve again on next use)."""
        self._declared.clear()
        self._noted.clear()
        self._file_strict = False
        self.strict_override = None
        self.source = None
        self._resolved = False
        self._changed()

    def _ensure_resolved(self) -> None:
        if self._resolved:
            return
        with self._lock:
            if not self._resolved:
                if self._resolve is not None:
                    self._resolve(self)
                self._resolved = True

    # -- asking ------------------------------------------------------------------------------

    @property
    def strict(self) -> bool:
        self._ensure_resolved()
        return self._file_strict if self.strict_override is None else self.strict_override

    @property
    def active(self) -> bool:
        """Whether any registry is in force (else it neither refuses nor logs anything)."""
        self._ensure_resolved()
        return bool(self._declared) or self.source is not None or self.strict

    def declarations(self) -> list[Declaration]:
        self._ensure_resolved()
        return [self._declared[key] for key in sorted(self._declared)]

    def get(self, key: str, kind: str | None = None) -> Declaration | None:
        """The declaration of ``key`` (for scopes of ``kind``, if given), or None."""
        self._ensure_resolved()
        found = self._declared.get(key)
        if found is None or (kind is not None and kind not in found.scopes):
            return None
        return found

    def missing(self, kind: str, key: str, default: Any) -> Any:
        """What a read of an unset ``key`` returns: the caller's default if one was passed
        (``default`` is not ``UNSET``), else the declared default, else None."""
        self.note_read(kind, key)
        if default is not UNSET:
            return default
        found = self.get(key, kind)
        return found.default if found is not None and found.has_default else None

    def note_read(self, kind: str, key: str) -> None:
        """Log the first read of an undeclared key in this process (a typo returns a default)."""
        if (kind, key) in self._noted:
            return
        # ``active``, spelled out: this runs on every first read of a scope in a task.
        if not self._resolved:
            self._ensure_resolved()
        strict = self._file_strict if self.strict_override is None else self.strict_override
        if not (self._declared or self.source is not None or strict):
            return
        self._noted.add((kind, key))
        if self.get(key, kind) is None:
            log.warning("option.undeclared_read", key=key, scope_kind=kind)

    def check_write(self, write: Write, *, many: bool = False) -> None:
        """Refuse a write the registry forbids, naming the field; nothing is written."""
        if write.scope.is_tag_keys or not self.active:
            return
        strict = self.strict
        for key, text in write.sets.items():
            where = f"values[{key!r}]" if many else "value"
            found = self._check_key(write.scope, key, "values" if many else "key", strict)
            if found is not None:
                check_value(found.schema, json.loads(text), where)
        for position, key in enumerate(write.unsets):
            self._check_key(write.scope, key, f"unset[{position}]" if many else "key", strict)

    def _check_key(self, scope: Scope, key: str, where: str, strict: bool) -> Declaration | None:
        found = self._declared.get(key)
        if found is None:
            if strict:
                raise InvalidOption(where, f"{key!r} is not a declared option (strict registry)")
            return None
        if scope.kind not in found.scopes:
            raise InvalidOption(
                "scope", f"{key!r} is declared for {', '.join(found.scopes)} scopes, not {scope}"
            )
        if found.read_only:
            raise InvalidOption(where, f"{key!r} is read-only at runtime")
        if found.deprecated:
            log.warning("option.deprecated_write", key=key, scope=scope.name)
        return found


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no default>"


# The read API's default for ``default``: tells "no default passed" from ``default=None``.
UNSET: Any = _Unset()
