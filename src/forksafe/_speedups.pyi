"""Stubs for the optional C extension built from ``_speedups.c``."""

from typing import Any, Callable

class Recorder:
    __wrapped__: Callable[..., Any]
    def __init__(
        self,
        original: Callable[..., Any],
        origins: dict[int, Any],
        known: dict[str, bool],
        slow: Callable[[object, Any, object], None],
        prune: Callable[[dict[int, Any]], None],
        limit: int,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

def stacks(
    active: dict[int, Any],
    me: int,
    dummy: type,
    name_key: str,
    daemon_key: str,
    limit: int,
) -> int | None: ...
