"""optionstore's read API and configuration; usable inside any Celery task or any process.

Importing it connects nothing and reads no setting: the first read (or write) configures the
process from the environment, unless ``configure()`` or ``worker.install()`` did it before.
"""

from __future__ import annotations

from typing import Any

from store.broadcast.codec import DEFAULT_MAX_MESSAGE_BYTES
from store.errors import (
    InvalidOption,
    InvalidToken,
    MigrationError,
    NotConfigured,
    NotMigrated,
    OptionsError,
    RevisionConflict,
    SignatureRefused,
    StoreUnavailable,
)
from store.local import TASK
from store.model.validation import (
    DEFAULT_MAX_SCOPE_BYTES,
    DEFAULT_MAX_SCOPE_KEYS,
    DEFAULT_MAX_VALUE_BYTES,
)
from store.options_store import DEFAULT_CATCH_UP_WAIT, OptionsStore
from store.process import WEB, WORKER, StoreProcess, broker_connections
from store.readers import GroupMeta, Options, ProjectOptions, TagKeys, UserOptions
from store.settings import signing_keys, signing_keys_from_environ
from store.signing.keys import Keyring
from store.signing.tasks import connect_task_signing
from store.snapshot import Snapshot, Snapshots
from store.tokens import HEADER as OPTIONS_AFTER
from store.tokens import connect_token_carrying, options_after, token_of

# The one owner of this process's optionstore lifecycle; everything below is a view of it.
runtime = StoreProcess()
backend = runtime.store

options = Options(backend)
project_options = ProjectOptions(backend)
user_options = UserOptions(backend)
group_meta = GroupMeta(backend)
tag_keys = TagKeys(backend)
# Declared options (store/model/registry.py): declare in code, or name a file in OPTIONS_REGISTRY.
registry = backend.registry

# Every options.* task this process publishes, from any Celery app, is signed when it holds a
# key (producers that send by name included). Connecting reads nothing: the key is resolved on
# the first publish.
connect_task_signing(runtime.keyring)
# A task that wrote passes its token on to the tasks it publishes (a chain's next step, a link).
connect_token_carrying()
# Each context's current snapshot (store.snapshot()): a thread's, an asyncio task's.
snapshots = Snapshots()


def configure(
    *,
    database_url: str,
    redis_url: str | None,
    local_cache: str = TASK,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    grace_period: float = 300.0,
    pool_max_size: int = 8,
    broker_url: str | None = None,
    broker_transport: str | None = None,
    broker_master_name: str | None = None,
    namespace: str = "optionstore",
    follow_broadcasts: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_scope_keys: int = DEFAULT_MAX_SCOPE_KEYS,
    max_scope_bytes: int = DEFAULT_MAX_SCOPE_BYTES,
    signing_key: str | None = None,
    catch_up_wait: float = DEFAULT_CATCH_UP_WAIT,
) -> OptionsStore:
    """Point this process at its services by hand; connections open lazily, after any fork.

    With ``broker_url``, every committed change is also broadcast on the reload exchange,
    through kombu's ``broker_transport`` if one is named, or the URL's own (TLS for ``rediss://``,
    ``broker_master_name`` for ``sentinel://``). With
    ``follow_broadcasts`` too, this process runs a reload consumer and caches only while it
    hears every change; without, its local cache is trusted as it is. A change whose
    message would encode larger than ``max_message_bytes`` is broadcast as "reload this scope".
    A write that would grow a scope past ``max_scope_keys`` keys or ``max_scope_bytes`` of
    encoded values is refused.
    ``signing_key`` (comma-separated for several: the first signs, every one verifies) signs
    the write tasks and reload messages this process sends and checks those it receives; None
    takes OPTIONS_SIGNING_KEY (or OPTIONS_SIGNING_KEY_FILE) if set; "" turns signing off.
    ``catch_up_wait``: how long ``catch_up`` (and a task with an ``options_after`` token) waits
    for a broadcast before loading the scope from the store.
    """
    keys = signing_keys_from_environ() if signing_key is None else signing_keys(signing_key)
    publish, follow = (
        (None, None)
        if broker_url is None
        else broker_connections(
            broker_url, master_name=broker_master_name, transport=broker_transport
        )
    )
    return runtime.configure(
        database_url=database_url,
        redis_url=redis_url,
        local_cache=local_cache,
        max_value_bytes=max_value_bytes,
        grace_period=grace_period,
        pool_max_size=pool_max_size,
        namespace=namespace,
        publish=publish,
        follow=follow if follow_broadcasts else None,
        max_message_bytes=max_message_bytes,
        max_scope_keys=max_scope_keys,
        max_scope_bytes=max_scope_bytes,
        keyring=Keyring(keys) if keys else None,
        catch_up_wait=catch_up_wait,
    )


def snapshot() -> Snapshot:
    """One consistent view of the scopes read through it (``snapshot().project_options
    .get_value(...)``, and every other reader): a scope's first read pins its state, and every
    later read of it returns that state, whatever broadcasts arrive meanwhile.

    Inside a task of an installed app, every call returns the task's snapshot, dropped when the
    task ends. Elsewhere each call returns a new one; ``with store.snapshot() as view:`` makes
    it the current one of this thread (or asyncio task) for the block.
    """
    return snapshots.open(backend)


def catch_up(*writes: Any, wait: float | None = None) -> dict[str, str]:
    """Make this process read the scopes of ``writes`` (write task results, or tokens
    ``{scope: revision}``) at those revisions or newer: what a web request that made a write
    calls before reading it back. Waits for the broadcast up to ``wait`` seconds
    (OPTIONS_CATCH_UP_WAIT), then loads from the store. Returns what happened per scope
    (``OptionsStore.catch_up``). A malformed token raises InvalidToken naming the field."""
    return backend.catch_up(token_of(*writes), wait=wait)


def clear_local_cache() -> None:
    """Forget every locally cached scope in this process (what ``task_postrun`` does per task)."""
    backend.local.clear()


__all__ = [
    "OPTIONS_AFTER",
    "WEB",
    "WORKER",
    "InvalidOption",
    "InvalidToken",
    "MigrationError",
    "NotConfigured",
    "NotMigrated",
    "OptionsError",
    "RevisionConflict",
    "SignatureRefused",
    "Snapshot",
    "StoreUnavailable",
    "backend",
    "catch_up",
    "clear_local_cache",
    "configure",
    "group_meta",
    "options",
    "options_after",
    "project_options",
    "registry",
    "runtime",
    "snapshot",
    "snapshots",
    "tag_keys",
    "user_options",
]
