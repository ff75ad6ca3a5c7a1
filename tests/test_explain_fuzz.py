"""`forksafe explain` is total: fuzzed reports give the summary or one line, exit 0 or 2.

Three sources of input, each run in the regular suite within a few seconds:

* reports built by hypothesis strategies, where every field is either of the right
  shape or any JSON value at all;
* byte mutations (flips, insertions, deletions, cuts) of real files: a run report, a
  check and a FORKSAFE_REPORT event file, written by forksafe itself in this session;
* structural mutations of the same: a value anywhere replaced by any JSON value, a key
  dropped, a value nested deeply.

Every input goes through the text summary and through ``--html`` alike: the page
must be refused exactly when the text is, and be an inert page otherwise.

``FORKSAFE_FUZZ_EXAMPLES=N`` runs N examples per test instead (a long run outside CI).
"""

from __future__ import annotations

import contextlib
import html.parser
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forksafe import _cli

EXAMPLES = int(os.environ.get("FORKSAFE_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 100, deadline=None, derandomize=EXAMPLES is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

APP = """
import ctypes, os, threading, time
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
for i in range(3):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            ctypes.string_at(0)
        os._exit(0)
    os.waitpid(pid, 0)
"""

#: What every run of explain must end in; counted, so that the test shows what it tried.
SEEN: dict[str, int] = {"rendered": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def _say_what_was_tried() -> Any:
    """With ``-s``, how many fuzzed inputs rendered and how many were refused."""
    yield
    print(f"\nexplain fuzz: {SEEN['rendered']} rendered, {SEEN['refused']} refused in one line")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A run report, a check and an event file, each written by forksafe itself."""
    where = tmp_path_factory.mktemp("real")
    (where / "app.py").write_text(APP)
    env = dict(os.environ, FORKSAFE_POLICY="", FORKSAFE_HANG_TIMEOUT="", FORKSAFE_FAIL_ON="",
               FORKSAFE_REPORT="")
    subprocess.run([sys.executable, "-m", "forksafe", "run", "--policy", "log", "--report",
                    "run.json", "--", sys.executable, "app.py"], cwd=where, env=env,
                   capture_output=True, timeout=60, check=True)
    subprocess.run([sys.executable, "app.py"], cwd=where, capture_output=True, timeout=60,
                   env={**env, "FORKSAFE_REPORT": str(where / "events.jsonl")}, check=True)
    check = subprocess.run([sys.executable, "-m", "forksafe", "check", "--json"], cwd=where,
                           env=env, capture_output=True, timeout=60, check=True).stdout
    return {"run": (where / "run.json").read_bytes(), "check": check,
            "events": (where / "events.jsonl").read_bytes()}


def explain(data: bytes, tmp: pathlib.Path, *options: str) -> tuple[int, str, str]:
    """``forksafe explain`` on ``data``, in this process: exit code, stdout, stderr."""
    path = tmp / "fuzzed.json"
    path.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _cli.main(["explain", *options, str(path)])
    return code, out.getvalue(), err.getvalue()


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("href", "src")]


def total(data: bytes, tmp: pathlib.Path) -> None:
    """The property: exit 0 with a summary, or exit 2 with one line; never a traceback."""
    code, out, err = explain(data, tmp)
    assert "Traceback" not in err and "Traceback" not in out.split("child's stacks")[0]
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and out == "", err
        # A failure of ours would hide behind the catch-all's "corrupt: <Exception>: ...".
        assert "corrupt: " not in err or "Error: " not in err, err
        SEEN["refused"] += 1
    else:
        assert out.startswith("forksafe: "), out
        SEEN["rendered"] += 1
    page_code, page, page_err = explain(data, tmp, "--html")
    assert page_code == code, (page_code, page_err)
    if code == 2:
        assert page == "" and page_err == err, page_err
    else:
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        parser = _Tags()
        parser.feed(page)
        parser.close()
        assert "script" not in parser.tags and "img" not in parser.tags
        assert all(link.startswith("#") for link in parser.links), parser.links


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes anything (so that many reports get as far as the
    summary, and each field is sometimes wrong)."""
    return st.integers(0, 11).flatmap(lambda n: good if n else JSON)


SITE = st.fixed_dictionaries({"file": either(st.text(max_size=30)), "line": either(st.integers()),
                              "function": either(st.text(max_size=10))})
HAZARD = st.fixed_dictionaries(
    {"kind": either(st.sampled_from(["thread", "native-runtime", "native-thread",
                                     "sqlite-connection", "event-loop", "preexec-fn",
                                     "probe-error", "martian"])),
     "severity": either(st.sampled_from(["info", "warning", "error", "fatal"])),
     "summary": either(st.text(max_size=40)), "remedy": either(st.text(max_size=40)),
     "evidence": either(st.dictionaries(st.sampled_from(
         ["name", "locks", "started_at", "current", "libraries", "threads", "runtime",
          "active", "signals", "owner", "opened_at", "loop", "error"]), JSON, max_size=5))})
OUTCOME = st.fixed_dictionaries(
    {"status": either(st.sampled_from(["exited", "signaled", "hung", "unknown", "lost"])),
     "exit_code": either(st.integers(-1, 300) | st.none()),
     "signal": either(st.sampled_from(["SIGSEGV", "SIGKILL", "SIGTERM", "SIGFOO"]) | st.none()),
     "traceback": either(st.text(max_size=60) | st.none()),
     "diagnosis": either(st.text(max_size=60) | st.none())})
FORK = st.fixed_dictionaries(
    {"parent_pid": either(st.integers(0, 2**22)), "mechanism": either(st.text(max_size=15)),
     "action": either(st.sampled_from(["allowed", "logged", "warned", "refused"])),
     "hazards": either(st.lists(either(HAZARD), max_size=3))},
    optional={"child_pid": either(st.integers(0, 2**22) | st.none()),
              "site": either(SITE | st.none()), "thread": either(st.text(max_size=10)),
              "time": either(st.sampled_from(["2026-11-25T10:00:00Z", "yesterday"])
                             | st.integers()),
              "outcome": either(OUTCOME), "count": either(st.integers(1, 1000)),
              "process_command": JSON})
RUN = st.fixed_dictionaries(
    {"schema": either(st.just("forksafe-report/1")),
     "command": either(st.lists(st.text(max_size=10), max_size=3)),
     "exit_code": either(st.integers(-1, 300)),
     "forks": either(st.lists(either(FORK), max_size=6))},
    optional={"forks_omitted": either(st.integers(0, 10))})
CHECK = st.fixed_dictionaries(
    {"schema": either(st.just("forksafe-report/1")),
     "hazards": either(st.lists(either(HAZARD), max_size=3)),
     "parent_pid": either(st.integers()), "thread": either(st.text(max_size=10))},
    optional={"time": either(st.just("2026-11-25T10:00:00Z"))})
ANY = st.dictionaries(st.sampled_from(["schema", "command", "exit_code", "forks", "hazards",
                                       "parent_pid", "thread", "type"]), JSON, max_size=5)


@FUZZ
@given(report=st.one_of(RUN, RUN, CHECK, ANY))
def test_generated_reports(report: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                           ) -> None:
    """Run reports and checks whose every field may be of the wrong shape, and any object."""
    total(json.dumps(report).encode(), tmp_path_factory.getbasetemp())


@FUZZ
@given(data=st.data())
def test_byte_mutations_of_real_files(real: dict[str, bytes], data: st.DataObject,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real files with bytes flipped, inserted, deleted, or cut off."""
    raw = bytearray(real[data.draw(st.sampled_from(sorted(real)))])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        byte = data.draw(st.sampled_from([0, 0x0A, 0x22, 0x5B, 0x5D, 0x7B, 0x7D, 0x2C, 0x3A,
                                          0x5C, 0x30, 0xC3, 0xFF, 0x1B]))
        if how == "flip" and at < len(raw):
            raw[at] = byte
        elif how == "insert":
            raw[at:at] = bytes([byte]) * data.draw(st.integers(1, 3))
        elif how == "delete":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            del raw[at:]
    total(bytes(raw), tmp_path_factory.getbasetemp())


#: Stands for a value nested 5,000 deep (made in the text: Python's own json cannot).
DEEP = "\u2063deep\u2063"


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value``."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _places(item, (*path, index))
    return found


@FUZZ
@given(data=st.data())
def test_structural_mutations_of_real_files(real: dict[str, bytes], data: st.DataObject,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real files with a value anywhere replaced by anything, a key dropped, or nested deep."""
    name = data.draw(st.sampled_from(sorted(real)))
    lines = real[name].decode().splitlines() if name == "events" else [real[name].decode()]
    docs = [json.loads(line) for line in lines]
    for _ in range(data.draw(st.integers(1, 3))):
        doc_index = data.draw(st.integers(0, len(docs) - 1))
        path = data.draw(st.sampled_from(_places(docs[doc_index])))
        how = data.draw(st.sampled_from(["replace", "drop", "nest", "wrap"]))
        if not path:
            docs[doc_index] = data.draw(JSON) if how != "nest" else DEEP
            continue
        parent = docs[doc_index]
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if how == "replace":
            parent[last] = data.draw(JSON)
        elif how == "drop":
            del parent[last]
        elif how == "nest":
            parent[last] = DEEP
        else:
            parent[last] = [parent[last]]
    text = "\n".join(json.dumps(doc) for doc in docs)
    text = text.replace(json.dumps(DEEP), "[" * 5000 + "1" + "]" * 5000)
    total(text.encode(), tmp_path_factory.getbasetemp())


def test_the_real_files_themselves_render(real: dict[str, bytes], tmp_path: pathlib.Path
                                          ) -> None:
    """Safe twin: unmutated, each of the three renders (exit 0), as text and as a page."""
    for name, data in real.items():
        code, out, err = explain(data, tmp_path)
        assert code == 0, (name, err)
        assert out.startswith("forksafe: ")
        code, page, err = explain(data, tmp_path, "--html")
        assert code == 0 and page.startswith("<!DOCTYPE html>"), (name, err)
