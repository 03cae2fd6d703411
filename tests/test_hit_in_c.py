"""The readers' local hit in C (store/_hit.c) answers exactly what their Python method answers.

The C method answers hits itself and hands every other call to the Python method; these tests
compare the two on generated calls (ids of every type, hits and misses, defaults given or not,
positional and keyword arguments, unhashable keys) against a reader whose miss path answers
with a marker instead of going to Redis. The integration tests read through the C method on
real workers wherever it is built.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.local import ScopeState
from store.model.registry import UNSET
from store.readers import HIT_IN_C, GroupMeta, ProjectOptions
from tests.conftest import ROOT

needs_c = pytest.mark.skipif(not HIT_IN_C, reason="store._hit is not built here")


class _Registry:
    def missing(self, kind: str, key: str, default: Any) -> Any:
        return ("missing", kind, key, "UNSET" if default is UNSET else default)

    def note_read(self, kind: str, key: str) -> None:
        pass


class _Holder:
    scopes: dict[str, ScopeState] = {}  # noqa: RUF012  # read-only here


class _Local:
    holder = _Holder()


class _Store:
    def state(self, name: str) -> ScopeState:
        return ScopeState(7, {"loaded": name})


def _reader(kind: type[ProjectOptions] | type[GroupMeta], values: dict[int, dict[str, Any]]) -> Any:
    """A reader over ``values`` (id -> that scope's values), the declared default ``d`` under
    them, and a miss path that answers without any service."""
    reader = object.__new__(kind)
    reader._store = _Store()
    reader._local = _Local()
    reader._registry = _Registry()
    reads = {ident: {"d": "declared", **scope} for ident, scope in values.items()}
    if kind is ProjectOptions:
        reader._projects, reader._reads = values, reads
    else:
        reader._groups, reader._reads = values, reads
    return reader


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return ("value", call())
    except Exception as exc:
        return ("raised", (type(exc), str(exc)))


IDS = st.one_of(
    st.integers(min_value=-3, max_value=5),
    st.integers(min_value=2**62, max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=False, min_value=-2, max_value=5),
    st.text(max_size=3),
    st.none(),
)
KEYS = st.one_of(st.sampled_from(["a", "b", "d", "missing", ""]), st.just(["un", "hashable"]))
VALUES = st.dictionaries(
    st.integers(min_value=0, max_value=4),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.integers(), st.none())),
    max_size=4,
)


@needs_c
@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from([ProjectOptions, GroupMeta]),
    values=VALUES,
    ident=IDS,
    key=KEYS,
    default=st.one_of(st.just(UNSET), st.none(), st.integers()),
    form=st.sampled_from(["positional", "no default", "keywords", "default keyword"]),
)
def test_the_c_hit_answers_what_the_python_method_answers(
    *,
    kind: type[ProjectOptions] | type[GroupMeta],
    values: dict[int, dict[str, Any]],
    ident: Any,
    key: Any,
    default: Any,
    form: str,
) -> None:
    reader = _reader(kind, values)
    in_c = reader.get_value
    in_python = type(reader).get_value.slow.__get__(reader)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name = "project_id" if kind is ProjectOptions else "group_id"
    if form == "positional":
        args, kwargs = (ident, key, default), {}
    elif form == "no default":
        args, kwargs = (ident, key), {}
    elif form == "keywords":
        args, kwargs = (), {name: ident, "key": key, "default": default}
    else:
        args, kwargs = (ident, key), {"default": default}
    assert _outcome(lambda: in_c(*args, **kwargs)) == _outcome(lambda: in_python(*args, **kwargs))


@needs_c
def test_a_hit_is_the_cached_value_and_a_bool_or_float_id_is_not_a_project() -> None:
    reader = _reader(ProjectOptions, {1: {"a": "one"}})
    assert reader.get_value(1, "a") == "one"
    assert reader.get_value(1, "d") == "declared"  # the declared default under the values
    assert reader.get_value(1, "d", "mine") == "mine"  # a caller's default wins
    assert reader.get_value(1, "a", "mine") == "one"
    # True == 1 and 1.0 == 1 as dict keys: the Python method decides (and refuses them).
    for not_an_id in (True, 1.0):
        with pytest.raises(Exception, match="project_id"):
            reader.get_value(not_an_id, "a")


@needs_c
def test_wrong_arguments_fail_like_the_python_method() -> None:
    reader = _reader(ProjectOptions, {1: {"a": "one"}})
    with pytest.raises(TypeError, match="get_value"):
        reader.get_value(1)
    with pytest.raises(TypeError, match="get_value"):
        reader.get_value(1, "a", None, "extra")
    with pytest.raises(TypeError, match="unexpected keyword"):
        reader.get_value(1, "a", nope=1)
    with pytest.raises(AttributeError, match="_reads"):
        ProjectOptions.get_value(object(), 1, "a")  # not a reader: the Python method's error


@needs_c
def test_reads_leak_no_reference() -> None:
    value, default = object(), object()
    reader = _reader(ProjectOptions, {1: {"a": value}})
    before = [sys.getrefcount(x) for x in (reader, value, default)]
    for _ in range(1000):
        reader.get_value(1, "a")
        reader.get_value(1, "a", default)
        reader.get_value(1, "b", default)
        reader.get_value(1, "missing")
    gc.collect()
    assert [sys.getrefcount(x) for x in (reader, value, default)] == before


@needs_c
def test_hits_race_changes_of_the_maps_from_another_thread() -> None:
    # The consumer thread replaces and drops scopes while tasks read: a read returns a value
    # the map held, or goes to the miss path, and never crashes.
    values: dict[int, dict[str, Any]] = {1: {"a": 0}}
    reader = _reader(ProjectOptions, values)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            reader._projects[1] = {"a": n}
            reader._reads[1] = {"d": "declared", "a": n}
            if n % 7 == 0:
                reader._reads.pop(1, None)
                reader._projects.pop(1, None)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(200_000):
            answer = reader.get_value(1, "a")
            assert isinstance(answer, int) or answer[0] == "loaded" or answer[0] == "missing"
    finally:
        stop.set()
        thread.join()


def test_ci_builds_the_c_hit() -> None:
    # On CI (and wherever make venv ran with a C compiler) the extension must be there; a
    # build that silently fell back to Python would lose the read path's speed unnoticed.
    if os.environ.get("CI") != "true":
        pytest.skip("only CI insists on the build")
    assert HIT_IN_C


def test_without_a_c_compiler_the_package_builds_and_reads_in_python(tmp_path: Path) -> None:
    # The extension is optional: a machine with no compiler still installs, and reads through
    # the Python method. Built from a copy of the project's files, so no earlier build is reused.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = tmp_path / "source"
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "CC": "false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("optionstore-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert not [n for n in names if n.endswith(".so")], names
    assert "store/_hit.pyi" in names
    # -S: no site module, so not the editable install of this checkout; the wheel's files
    # first, then the dependencies from this environment.
    packages = [p for p in sys.path if p.endswith("site-packages")]
    probe = (
        "import store.readers as r, types; "
        f"assert r.__file__.startswith({str(site)!r}), r.__file__; "
        "assert not r.HIT_IN_C; "
        "assert isinstance(r.ProjectOptions.get_value, types.FunctionType)"
    )
    read = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *packages])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert read.returncode == 0, read.stderr[-3000:]
