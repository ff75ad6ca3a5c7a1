"""The guard's ``os.wait*`` wrappers: they tell the fork record that a child was reaped.

``multiprocessing`` (``Process.join``, ``exitcode``, Pool and executor workers)
reaps through ``os.waitpid`` looked up at call time, so these wrappers see its
children too. A child that exited has nothing urgent to say: without a report file
or a hang timeout its reap is queued with its fork and recorded by the batch
(``forksafe._record.flush``); a child killed by a signal, or that exited with a
failure, is recorded at once, so that its warning comes at its own wait.

Apart from the fork path (``forksafe._forkpath``) because they run after a child
is gone: what they write then is copied for no child (copy-on-write), so they need
not be spelled out for the pages they touch.
"""

from __future__ import annotations

import os

from forksafe import _forkpath, _record

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    from typing import Any, Callable, Tuple

    WaitResult = Tuple[Any, ...]


def wrap_wait(original: Callable[..., WaitResult]) -> Callable[..., WaitResult]:
    """``os.waitpid``/``wait``/``wait3``/``wait4``: tell the record of a reaped child."""
    getpid = os.getpid
    path = _forkpath

    def wait(*args: Any, **kwargs: Any) -> WaitResult:
        result = original(*args, **kwargs)
        pid = result[0]
        config = path.config
        if pid > 0 and config is not None:
            status = result[1]
            if path.defer and status == 0:  # exited 0: nothing to say at once
                queue = path.own_state(getpid()).queue
                queue.append((pid, status))
                if len(queue) >= path.QUEUE_SIZE:
                    path.flush_pending()
            else:
                st = path.own_state()
                _record.flush(st, config)
                _record.reap(st, pid, status)
        return result

    return wait


def wrap_waitid(original: Callable[..., Any]) -> Callable[..., Any]:
    """``os.waitid`` reports a child as a ``waitid_result``, not a wait status."""

    def waitid(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        config = _forkpath.config
        if result is None or config is None:
            return result
        options = args[2] if len(args) > 2 else kwargs.get("options", 0)
        pid = result.si_pid
        if options & getattr(os, "WNOWAIT", 0):  # only a peek: the child is reaped later
            return result
        st = _forkpath.own_state()
        _record.flush(st, config)
        status = wait_status(result.si_code, result.si_status)
        if status is not None:
            _record.reap(st, pid, status)
        return result

    return waitid


def wait_status(code: int, value: int) -> int | None:
    """The ``wait()`` status that a ``waitid`` answer stands for (None: not an end)."""
    if code == os.CLD_EXITED:
        return (value & 0xFF) << 8
    if code == os.CLD_KILLED:
        return value & 0x7F
    if code == os.CLD_DUMPED:
        return (value & 0x7F) | 0x80
    return None
