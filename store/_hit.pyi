# The C readers' hit (store/_hit.c); optional, see store/readers.py.
from collections.abc import Callable
from typing import Any

class HitMethod:
    slow: Callable[..., Any]
    def __init__(
        self,
        owner: type,
        reads: str,
        values: str,
        unset: object,
        slow: Callable[..., Any],
        miss: Callable[..., Any],
    ) -> None: ...
    def __get__(self, obj: object, objtype: type | None = None) -> Callable[..., Any]: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
