"""A small web application, as a pre-forking server (gunicorn --preload) imports it.

Nothing here is unusual, and every line of it is a fork hazard: the preloading
parent starts a cache-refresh thread that spends most of its time holding a
lock, opens its SQLite database, and warms up a native image kernel that runs
on GNU OpenMP. Every worker the server forks afterwards inherits all three.
"""

from __future__ import annotations

import ctypes
import os
import sqlite3
import tempfile
import threading
import time

_cache_lock = threading.Lock()
_rates: dict[str, float] = {}


def _fetch_rates() -> dict[str, float]:
    time.sleep(0.5)  # a slow upstream call, made while holding the lock
    return {"EUR": 1.0, "USD": 1.08}


def _refresh_forever() -> None:
    while True:
        with _cache_lock:
            _rates.update(_fetch_rates())
        time.sleep(0.05)


def rates() -> dict[str, float]:
    """What a request handler calls: it needs the lock the refresher holds."""
    with _cache_lock:
        return dict(_rates)


refresher = threading.Thread(target=_refresh_forever, name="cache-refresher", daemon=True)
refresher.start()

db = sqlite3.connect(os.path.join(tempfile.gettempdir(), "forksafe-demo-webapp.db"))
db.execute("create table if not exists hits (path text, at real)")

kernel = None
if os.environ.get("WEBAPP_KERNEL"):
    kernel = ctypes.CDLL(os.environ["WEBAPP_KERNEL"])
    kernel.blur(256)  # warm-up: starts GNU OpenMP's worker pool

time.sleep(0.1)  # let the refresher take its lock, as it does most of the time


def serve() -> None:
    """A pre-forking server in miniature: fork one worker per job, then wait for them.

    One worker serves a request (it needs ``_cache_lock``), one runs the OpenMP
    kernel. Run bare, this waits forever; under ``forksafe run --hang-timeout 1``
    both hangs are diagnosed and the stuck workers ended, so it returns.
    """
    jobs = [rates]
    if kernel is not None:
        jobs.append(lambda: kernel.blur(256))
    workers = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            job()
            os._exit(0)
        workers.append(pid)
    for pid in workers:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    serve()
