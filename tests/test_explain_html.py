"""A picture of a run: the process tree in the summary, and `forksafe explain --html`.

The page is checked three ways: its structure, parsed with ``html.parser`` (one
document, no script, nothing loaded from anywhere, every report string escaped);
what it says (the findings, the tree, the timeline); and, when a Chromium is
installed, what a real headless browser makes of it.
"""

from __future__ import annotations

import html.parser
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

from forksafe._explain import OUTPUT_WRITTEN
from forksafe._render.tree import HEAD as TREE_HEAD
from forksafe._runreport import render_page, render_run

#: COMMAND: three workers each fork two children; one of those crashes. Then a pool.
NESTED = """
import ctypes, multiprocessing, os
def square(i):
    return i * i
workers = []
for w in range(3):
    pid = os.fork()  # worker-line
    if pid == 0:
        kids = []
        for g in range(2):
            kid = os.fork()  # child-line
            if kid == 0:
                if w == 1 and g == 1:
                    ctypes.string_at(0)
                os._exit(0)
            kids.append(kid)
        for kid in kids:
            os.waitpid(kid, 0)
        os._exit(0)
    workers.append(pid)
for pid in workers:
    os.waitpid(pid, 0)
if __name__ == "__main__":
    pool = multiprocessing.get_context("fork").Pool(2)
    pool.map(square, range(4))
    pool.close()
    pool.join()
"""


def forksafe(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`forksafe ARGS` in a session of its own, its whole group killed if it overstays."""
    proc = subprocess.Popen([sys.executable, "-m", "forksafe", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    """A real run of NESTED: its directory (with r.json) and its live summary."""
    where = tmp_path_factory.mktemp("nested")
    (where / "app.py").write_text(NESTED)
    proc = forksafe(where, "run", "--policy", "log", "--report", "r.json", "--",
                    sys.executable, "app.py")
    assert proc.returncode == 0, proc.stderr
    return where, proc.stderr


class Page(html.parser.HTMLParser):
    """What a page is made of: its tags, attributes and text (entities decoded)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((tag, name, value or "") for name, value in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def words(self) -> str:
        return "".join(self.text)


def well_formed(text: str) -> Page:
    """The page's structure: one document, inert and self-contained."""
    assert text.startswith("<!DOCTYPE html>\n<html")
    page = Page(text)
    assert page.tags.count("html") == page.tags.count("body") == 1
    assert page.tags.count("style") == 1
    assert not {"script", "link", "img", "iframe", "object", "embed", "base", "form",
                "input", "audio", "video", "source"} & set(page.tags), "inert: nothing runs"
    for tag, name, value in page.attributes:
        assert not name.startswith("on"), (tag, name, value)
        assert name not in ("src", "srcset", "action", "xmlns", "style"), (tag, name)
        if name == "href":
            assert value.startswith("#"), f"only the page's own anchors: {value!r}"
    assert "http:" not in text and "https:" not in text and "url(" not in text
    policy = [v for tag, name, v in page.attributes if tag == "meta" and name == "content"
              and v.startswith("default-src 'none'")]
    assert policy, "a Content Security Policy forbids loading anything"
    return page


# -- the tree in the summary -------------------------------------------------------------


def test_the_summary_draws_the_tree_of_a_nested_run(nested: tuple[pathlib.Path, str]
                                                    ) -> None:
    """Workers that fork: the tree groups the two alike workers (x2, their four children
    below) and sets apart the one whose child crashed; explain says the same."""
    where, live = nested
    assert TREE_HEAD in live
    tree = live[live.index(TREE_HEAD):].splitlines()
    assert "(COMMAND)" in tree[1] and "app.py" in tree[1]
    assert "  |- os.fork at app.py:7 in <module> x2: exited 0" in tree
    assert "  |  `- os.fork at app.py:11 in <module> x4: exited 0" in tree
    assert "  |  `- os.fork at app.py:11 in <module>: killed by SIGSEGV" in tree
    assert "  `- multiprocessing.Pool at app.py:24 in <module> x2: exited 0" in tree
    saved = forksafe(where, "explain", "r.json")
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() in live, "the saved report draws the very same tree"


def test_a_flat_run_has_no_tree() -> None:
    """Safe twin: one process forking children that fork nothing: the findings say it
    all, no tree is drawn."""
    forks = [{"parent_pid": 1, "child_pid": 2 + i, "time": 0, "mechanism": "os.fork",
              "site": None, "action": "allowed", "hazards": [],
              "outcome": {"status": "exited", "exit_code": 0}} for i in range(3)]
    text = render_run({"schema": "forksafe-report/1", "command": ["app"], "exit_code": 0,
                       "forks": forks})
    assert TREE_HEAD not in text


def pool_of(workers: int, *, crash: int | None = None) -> dict[str, Any]:
    """A report: COMMAND (pid 1) forks ``workers`` workers, each forking one child."""
    def fork(parent: int, child: int, line: int, status: dict[str, Any]) -> dict[str, Any]:
        return {"parent_pid": parent, "child_pid": child, "time": "2026-11-25T10:00:03Z",
                "mechanism": "multiprocessing.Pool" if line == 5 else "os.fork",
                "site": {"file": "app.py", "line": line, "function": "work"},
                "action": "allowed", "hazards": [], "outcome": status,
                "process_command": ["app.py"]}

    ok = {"status": "exited", "exit_code": 0}
    forks = []
    for n in range(workers):
        forks.append(fork(1, 100 + n, 5, ok))
        fate = {"status": "signaled", "signal": "SIGSEGV", "diagnosis": "crashed"} \
            if n == crash else ok
        forks.append(fork(100 + n, 5000 + n, 9, fate))
    return {"schema": "forksafe-report/1", "command": ["python", "app.py"], "exit_code": 0,
            "pid": 1, "started": "2026-11-25T10:00:00Z", "duration": 9.5, "forks": forks}


def test_a_pool_of_a_thousand_workers_is_two_lines_not_a_thousand() -> None:
    """1,000 alike workers, each forking a child: one line for the workers, one below;
    the one whose child crashed stands apart."""
    text = render_run(pool_of(1000, crash=7))
    tree = text[text.index(TREE_HEAD):].splitlines()
    assert tree == [
        TREE_HEAD,
        "  pid 1 `app.py` (COMMAND)",
        "  |- multiprocessing.Pool at app.py:5 in work x999: exited 0",
        "  |  `- os.fork at app.py:9 in work x999: exited 0",
        "  `- multiprocessing.Pool at app.py:5 in work: exited 0",
        "     `- os.fork at app.py:9 in work: killed by SIGSEGV",
    ]


def test_counted_entries_hostile_cycles_and_depth_draw_sensibly() -> None:
    """An entry standing for 500 forks counts as 500; a cycle of pids (reuse, or a forged
    report) ends where it comes back; a chain 200 deep is cut; the text stays short."""
    base = pool_of(1)
    counted = {**base["forks"][1], "child_pid": 6000, "count": 500}
    cycle = [{**base["forks"][0], "parent_pid": a, "child_pid": b}
             for a, b in ((7000, 7001), (7001, 7000))]
    chain = [{**base["forks"][0], "parent_pid": 8000 + n, "child_pid": 8001 + n}
             for n in range(200)]
    report = {**base, "forks": [*base["forks"], counted, *cycle, *chain]}
    text = render_run(report)
    assert "os.fork at app.py:9 in work x501: exited 0" in text
    tree = text[text.index(TREE_HEAD):].splitlines()
    assert len(tree) <= 42 and "deeper forks not drawn (more than 32 levels)" in tree[-1], tree
    assert "7000" not in text, "a cycle has no root: nothing of it is drawn"
    page = well_formed(render_page(report))
    assert "deeper forks not drawn" in page.words


# -- the page ----------------------------------------------------------------------------


def test_explain_html_of_a_real_run(nested: tuple[pathlib.Path, str]) -> None:
    """One self-contained page: the headline, each finding with its evidence and the
    crashed child's stacks, the tree, the timeline."""
    where, _ = nested
    proc = forksafe(where, "explain", "--html", "r.json", "-o", "page.html")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip() == OUTPUT_WRITTEN.format(what="page", path="page.html")
    text = (where / "page.html").read_text()
    page = well_formed(text)
    words = page.words
    assert "11 forks seen in" in words and "1 child crashed" in words
    assert "fork via os.fork at app.py:11 in <module> \u00d76: allowed" in words
    assert "Fatal Python error: Segmentation fault" in words, "the child's stacks"
    assert 'app.py", line 14 in <module>' in words
    assert page.tags.count("article") == 1, "one finding: the crash; the rest are clean"
    assert "Clean forks" in words and "multiprocessing.Pool at app.py:24" in words
    assert "pid" in words and "(COMMAND)" in words and page.tags.count("svg") == 1
    stdout = forksafe(where, "explain", "--html", "r.json")
    assert stdout.returncode == 0 and stdout.stdout == text


def test_every_report_string_is_escaped(tmp_path: pathlib.Path) -> None:
    """A hostile report (markup in every string it holds) stays text on the page."""
    evil = '<script>alert(1)</script>"\'><img src=x onerror=alert(1)></style>&amp;'
    fork = {"parent_pid": 1, "child_pid": 2, "time": "2026-11-25T10:00:01Z",
            "mechanism": evil, "thread": evil, "action": evil,
            "site": {"file": evil + ".py", "line": 1, "function": evil},
            "hazards": [{"kind": "thread", "severity": "warning", "summary": evil,
                         "remedy": evil, "evidence": {"name": evil, evil: [evil],
                                                      "current": [{"file": evil, "line": 2,
                                                                   "function": evil,
                                                                   "code": evil}]}}],
            "outcome": {"status": "signaled", "signal": "SIGSEGV", "traceback": evil,
                        "diagnosis": evil, "exit_code": None},
            "process_command": [evil]}
    grandchild = {**fork, "parent_pid": 2, "child_pid": 3}
    report = {"schema": "forksafe-report/1", "command": [evil], "exit_code": 0,
              "forks": [fork, grandchild]}
    (tmp_path / "evil.json").write_text(json.dumps(report))
    proc = forksafe(tmp_path, "explain", "--html", "evil.json")
    assert proc.returncode == 0, proc.stderr
    page = well_formed(proc.stdout)
    assert evil in page.words, "shown, as text"
    assert proc.stdout.count("<script>") == 0 and "<img" not in proc.stdout
    assert page.tags.count("style") == 1


def test_html_of_event_lines_and_of_a_check(tmp_path: pathlib.Path) -> None:
    """A FORKSAFE_REPORT file and a `forksafe check --json` get their pages too."""
    (tmp_path / "app.py").write_text(NESTED)
    env = {**os.environ, "FORKSAFE_REPORT": str(tmp_path / "events.jsonl"),
           "FORKSAFE_POLICY": "log"}
    run = subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        assert run.wait(timeout=60) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    events = forksafe(tmp_path, "explain", "--html", "events.jsonl")
    assert events.returncode == 0, events.stderr
    assert "killed by SIGSEGV" in well_formed(events.stdout).words
    (tmp_path / "check.py").write_text(
        "import json, subprocess, sys, threading\n"
        "threading.Thread(target=threading.Event().wait, name='idler', daemon=True).start()\n")
    check = forksafe(tmp_path, "check", "--import", "check", "--json")
    (tmp_path / "check.json").write_text(check.stdout)
    page = forksafe(tmp_path, "explain", "--html", "check.json")
    assert page.returncode == 0, page.stderr
    assert "idler" in well_formed(page.stdout).words


def test_bad_input_and_output_are_one_line(tmp_path: pathlib.Path) -> None:
    """A corrupt report and an unwritable OUT: one line each, exit 2, no page left."""
    (tmp_path / "torn.json").write_text('{"schema": "forksafe-report/1", "forks": [{"pa')
    torn = forksafe(tmp_path, "explain", "--html", "torn.json", "-o", "page.html")
    assert torn.returncode == 2 and len(torn.stderr.splitlines()) == 1, torn.stderr
    assert not (tmp_path / "page.html").exists()
    (tmp_path / "r.json").write_text(json.dumps(pool_of(2)))
    nowhere = forksafe(tmp_path, "explain", "--html", "r.json", "-o", "no/such/dir/p.html")
    assert nowhere.returncode == 2 and len(nowhere.stderr.splitlines()) == 1, nowhere.stderr
    assert nowhere.stderr.startswith("forksafe explain: cannot write 'no/such/dir/p.html'")


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (Debian: apt-get install "
                    "chromium): the page's structure is still checked without a browser")
def test_a_real_browser_shows_the_page(nested: tuple[pathlib.Path, str],
                                       tmp_path: pathlib.Path) -> None:
    """Headless Chromium loads the page, offline, and its DOM has the findings, the tree
    and the timeline; the page asked for nothing from the network."""
    where, _ = nested
    page = tmp_path / "page.html"
    proc = forksafe(where, "explain", "--html", "r.json", "-o", str(page))
    assert proc.returncode == 0, proc.stderr
    browser = chromium()
    assert browser is not None
    profile = tmp_path / "profile"
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu",
                             f"--user-data-dir={profile}", "--no-first-run", "--dump-dom",
                             page.as_uri()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.skip("the installed Chromium did not answer within 90 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    seen = Page(out)
    assert "killed by SIGSEGV" in seen.words and "Process tree" in seen.words
    assert seen.tags.count("article") == 1 and "svg" in seen.tags and "rect" in seen.tags
    assert "script" not in seen.tags


def test_past_the_edges_kept_the_tree_counts_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_EDGES entries with a child's pid (3 here), children are counted by parent
    and kind: every fork is still counted, and a process whose entry came past the bound
    is drawn as a root of its own."""
    from forksafe._render import tree

    monkeypatch.setattr(tree, "MAX_EDGES", 3)
    report = pool_of(4)  # entries: worker 0, its child, worker 1, its child, ...
    lines = render_run(report)
    drawn = lines[lines.index(TREE_HEAD):].splitlines()
    assert drawn[:4] == [
        TREE_HEAD, "  pid 1 `app.py` (COMMAND)",
        "  |- multiprocessing.Pool at app.py:5 in work x2: exited 0",
        "  |  `- os.fork at app.py:9 in work x2: exited 0"], drawn
    assert "  `- multiprocessing.Pool at app.py:5 in work x2: exited 0" in drawn
    assert "  2 processes `app.py`" in drawn, "workers 2 and 3: their own entries are roots"
