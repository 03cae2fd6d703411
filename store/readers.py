"""The read API, one class per seed manager; reads are dictionary lookups once a scope is local."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from store.events import log
from store.local import ScopeMap, ScopeState
from store.model.registry import UNSET, Registry
from store.model.scopes import (
    GLOBAL,
    GROUP,
    PROJECT,
    USER,
    Scope,
    group_scope,
    project_scope,
    tag_keys_scope,
    user_scope,
)


class _HoldsScopes(Protocol):
    @property
    def scopes(self) -> ScopeMap: ...


class _LocalView(Protocol):
    @property
    def shared(self) -> ScopeMap: ...

    @property
    def holder(self) -> _HoldsScopes: ...


class Source(Protocol):
    """What a reader reads from: the store (store/options_store.py), or a snapshot of it
    (store/snapshot.py)."""

    @property
    def local(self) -> _LocalView: ...

    @property
    def registry(self) -> Registry: ...

    def state(self, scope: str) -> ScopeState: ...

    def states(self, names: list[str]) -> dict[str, ScopeState]: ...


_PROJECT_NAMES: dict[int, str] = {}
_GROUP_NAMES: dict[int, str] = {}


# Scope names of ids already validated, so a local hit skips formatting an int (the slowest
# step of a read). Bounded: past the limit it simply starts over.
_NAMES_LIMIT = 100_000


def _named(names: dict[int, str], ident: object, make: Callable[[object], Scope]) -> str:
    name = make(ident).name  # validates
    if len(names) >= _NAMES_LIMIT:
        names.clear()
    names[ident] = name  # type: ignore[index]  # validated above: an int
    return name


class _Reader:
    # ``default`` is UNSET when the caller passed none: a key that is not set then reads as its
    # declared default (store/model/registry.py), else None. A caller's default always wins. Only a
    # miss pays for this: a hit is still one dictionary lookup and an identity check.
    __slots__ = ("_local", "_registry", "_store")

    def __init__(self, store: Source) -> None:
        self._store = store
        self._local = store.local
        self._registry: Registry = store.registry


class Options(_Reader):
    """Global options (the seed's ``Option.objects``)."""

    __slots__ = ("_shared",)

    def __init__(self, store: Source) -> None:
        super().__init__(store)
        self._shared = store.local.shared

    def get_value(self, key: str, default: Any = UNSET) -> Any:
        state = self._shared.get("global") or self._local.holder.scopes.get("global")
        if state is None:
            self._registry.note_read(GLOBAL, key)
            state = self._store.state("global")
        value = state.values.get(key, UNSET)
        return self._registry.missing(GLOBAL, key, default) if value is UNSET else value

    def get_all_values(self) -> dict[str, Any]:
        # A copy: the seed handed out its cache and let callers corrupt it.
        return dict(self._store.state("global").values)


class ProjectOptions(_Reader):
    """Per-project options (the seed's ``ProjectOption.objects``)."""

    __slots__ = ("_projects", "_reads")

    def __init__(self, store: Source) -> None:
        super().__init__(store)
        self._projects = store.local.shared.projects
        self._reads = store.local.shared.project_reads

    def get_value(self, project_id: int, key: str, default: Any = UNSET) -> Any:
        # The hot path: the shared map's values by project id (over the declared defaults,
        # unless the caller gave one), two subscripts and no method call; a try costs nothing
        # until a key is missing. The exact int check keeps True and 42.0 (equal to 1 and 42
        # as dict keys) away from those projects' caches. Everything else is in _read, so this
        # frame stays small.
        if type(project_id) is int:
            try:
                if default is UNSET:
                    return self._reads[project_id][key]
                return self._projects[project_id].get(key, default)
            except KeyError:
                pass
        return self._read(project_id, key, default)

    def _read(self, project_id: int, key: str, default: Any) -> Any:
        if type(project_id) is int and project_id in self._projects:
            return self._registry.missing(PROJECT, key, default)
        # Per-thread maps (a threads-pool worker), or not cached here yet.
        # An id is validated once, then known by its name.
        name = _PROJECT_NAMES.get(project_id) if type(project_id) is int else None
        if name is None:
            name = _named(_PROJECT_NAMES, project_id, project_scope)
        else:
            state = self._local.holder.scopes.get(name)
            if state is not None:
                value = state.values.get(key, UNSET)
                return self._registry.missing(PROJECT, key, default) if value is UNSET else value
        self._registry.note_read(PROJECT, key)
        value = self._store.state(name).values.get(key, UNSET)
        return self._registry.missing(PROJECT, key, default) if value is UNSET else value

    def get_all_values(self, project_id: int) -> dict[str, Any]:
        return dict(self._store.state(project_scope(project_id).name).values)

    def get_value_bulk(self, project_ids: Iterable[int], key: str) -> dict[int, Any]:
        return _bulk(self._store, {project_scope(p).name: p for p in project_ids}, key)


class UserOptions(_Reader):
    """Per-user options, optionally per (user, project) (the seed's ``UserOption.objects``)."""

    __slots__ = ()

    def get_value(
        self, user_id: int, project_id: int | None, key: str, default: Any = UNSET
    ) -> Any:
        value = self._store.state(user_scope(user_id, project_id).name).values.get(key, UNSET)
        if value is UNSET:
            return self._registry.missing(USER, key, default)
        self._registry.note_read(USER, key)
        return value

    def get_all_values(self, user_id: int, project_id: int | None = None) -> dict[str, Any]:
        return dict(self._store.state(user_scope(user_id, project_id).name).values)


class GroupMeta(_Reader):
    """Per-group metadata (the seed's ``GroupMeta.objects``), returning values, not rows."""

    __slots__ = ("_groups", "_reads")

    def __init__(self, store: Source) -> None:
        super().__init__(store)
        self._groups = store.local.shared.groups
        self._reads = store.local.shared.group_reads

    def get_value(self, group_id: int, key: str, default: Any = UNSET) -> Any:
        # Spelled out like ProjectOptions.get_value on purpose: a shared helper would add a
        # call to every local hit, a large part of a ~60 ns read.
        if type(group_id) is int:
            try:
                if default is UNSET:
                    return self._reads[group_id][key]
                return self._groups[group_id].get(key, default)
            except KeyError:
                pass
        return self._read(group_id, key, default)

    def _read(self, group_id: int, key: str, default: Any) -> Any:
        if type(group_id) is int and group_id in self._groups:
            return self._registry.missing(GROUP, key, default)
        # An id is validated once, then known by its name.
        name = _GROUP_NAMES.get(group_id) if type(group_id) is int else None
        if name is None:
            name = _named(_GROUP_NAMES, group_id, group_scope)
        else:
            state = self._local.holder.scopes.get(name)
            if state is not None:
                value = state.values.get(key, UNSET)
                return self._registry.missing(GROUP, key, default) if value is UNSET else value
        self._registry.note_read(GROUP, key)
        value = self._store.state(name).values.get(key, UNSET)
        return self._registry.missing(GROUP, key, default) if value is UNSET else value

    def get_all_values(self, group_id: int) -> dict[str, Any]:
        return dict(self._store.state(group_scope(group_id).name).values)

    def get_value_bulk(self, group_ids: Iterable[int], key: str) -> dict[int, Any]:
        return _bulk(self._store, {group_scope(g).name: g for g in group_ids}, key)


class TagKeys(_Reader):
    """Tag keys per project (the seed's ``TagKey.objects.all_keys``), invalidated on change."""

    __slots__ = ()

    def all_keys(self, project_id: int) -> list[str]:
        return self._store.state(tag_keys_scope(project_id).name).sorted_keys()


def _bulk(store: Source, ids_by_scope: dict[str, int], key: str) -> dict[int, Any]:
    states = store.states(list(ids_by_scope))
    return {
        ids_by_scope[scope]: state.values[key]
        for scope, state in states.items()
        if key in state.values
    }


def _hit_in_c(reader: type[_Reader], reads: str, values: str) -> bool:
    """Make ``reader.get_value`` the C build of its hit path (store/_hit.c) when there is one.

    The C method answers a local hit itself, hands a miss to ``_read`` (where the Python
    method sends its misses) and everything else (keyword arguments, an id that is not exactly
    an int) to the Python method above, unchanged, so the Python code remains the one
    definition of a read. The extension is optional: a source
    checkout that was not built, or an install without a C compiler, reads in Python.
    """
    try:
        from store._hit import HitMethod
    except ImportError:
        return False
    python_method, miss = reader.__dict__["get_value"], reader.__dict__["_read"]
    try:
        method = HitMethod(reader, reads, values, UNSET, python_method, miss)
    except TypeError as exc:  # a build older than this source (a checkout not rebuilt)
        log.warning("readers.c_hit_unusable", error=str(exc), fix="reinstall the package")
        return False
    setattr(reader, "get_value", method)  # noqa: B010
    return True


# True when the local hit of project options and group metadata runs in C.
HIT_IN_C = _hit_in_c(ProjectOptions, "_reads", "_projects") and _hit_in_c(
    GroupMeta, "_reads", "_groups"
)
