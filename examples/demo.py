"""The forksafe demo: check a real pre-forking web app, then show what its workers meet.

1. ``forksafe check --import webapp`` — what the server's preloading parent
   looks like at the moment it would fork its workers.
2. Fork anyway, twice, and watch the children: one handles a request that needs
   the cache lock, one calls the OpenMP kernel. Both were predicted by step 1.
3. ``forksafe run --hang-timeout 1 -- python webapp.py`` — the same two workers,
   forked by the app's own ``serve()``, followed from outside: each hang is
   diagnosed (which thread held which lock at fork time, which runtime's pool
   was active), the stuck workers are ended, and the run prints one summary.

Run from a clean clone: ``python examples/demo.py`` (gcc is used, when present,
to build the small OpenMP kernel; without it the OpenMP part is skipped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_TIMEOUT = 3.0


def build_kernel(out_dir: str) -> str | None:
    if shutil.which("gcc") is None:
        print("(gcc not found: the OpenMP kernel is skipped)")
        return None
    path = os.path.join(out_dir, "libkernel.so")
    subprocess.run(["gcc", "-O2", "-fopenmp", "-shared", "-fPIC", "-o", path,
                    os.path.join(HERE, "kernel.c")], check=True)
    return path


def fork_and_watch(what: str, call: str, env: dict[str, str]) -> None:
    """Import the app, fork, run ``call`` in the child, and report what became of it."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import webapp
        pid = os.fork()
        if pid == 0:
            {call}
            os._exit(0)
        deadline = time.monotonic() + {CHILD_TIMEOUT}
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("finished with status", status)
                sys.exit(0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("HUNG: still stuck after {CHILD_TIMEOUT:.0f} s, killed")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=60)
    print(f"  child that {what}: {proc.stdout.strip() or proc.stderr.strip()}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore::DeprecationWarning")
        kernel = build_kernel(tmp)
        if kernel:
            env["WEBAPP_KERNEL"] = kernel
        print("$ forksafe check --import webapp\n")
        check = subprocess.run([sys.executable, "-m", "forksafe", "check", "--import", "webapp"],
                               cwd=HERE, env=env, timeout=120)
        print(f"\n(exit code {check.returncode}: 1 means an error-level hazard was found)\n")
        print("What the server's workers meet if it forks anyway:")
        fork_and_watch("serves a request (takes _cache_lock)", "webapp.rates()", env)
        if kernel:
            fork_and_watch("runs the OpenMP kernel", "webapp.kernel.blur(256)", env)
        print("\n$ forksafe run --hang-timeout 1 -- python webapp.py\n")
        run = subprocess.run([sys.executable, "-m", "forksafe", "run", "--policy", "log",
                              "--hang-timeout", "1", "--", "python", "webapp.py"],
                             cwd=HERE, env=_with_python_on_path(env), timeout=120,
                             stderr=subprocess.PIPE, text=True)
        print(run.stderr.rstrip())
        print(f"\n(exit code {run.returncode}: the app's own, now that its workers were ended)")
    return 0


def _with_python_on_path(env: dict[str, str]) -> dict[str, str]:
    """`python` in the command above is this interpreter, wherever it lives."""
    bindir = os.path.dirname(sys.executable)
    return dict(env, PATH=bindir + os.pathsep + env.get("PATH", ""))


if __name__ == "__main__":
    sys.exit(main())
