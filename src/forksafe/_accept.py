"""Hazards a team has accepted, with its reason: rules that grade them ``info``.

A team that decided a given thread is fine (it is joined before every fork, say)
needs a way to say so, or ``-W error``, ``--fail-on warning`` and policy
``raise`` are unusable. A rule names a hazard kind and narrows it down, the way
pytest's ``filterwarnings`` and ruff's per-file ignores do, and always carries a
reason; an accepted hazard stays in every report, graded ``info``, as
"accepted: <reason>" — never silently dropped (``forksafe._grade``).

Rules come from ``forksafe.accept()``, the ``FORKSAFE_ACCEPT`` variable (which
``forksafe run --accept`` sets for its tree), ``--accept`` of ``forksafe check``,
and the ``accept`` list of ``[tool.forksafe]`` in ``pyproject.toml``. The text
form, in all but the API::

    KIND[/FIELD=GLOB]...: REASON          e.g.  thread/name=cache-*: joined before forking

several separated by ``;``. Fields: ``name`` (the thread's name), ``started_in``
(a module the thread was started from, or its target's module), ``runtime``
(a native runtime's catalog key, e.g. ``grpc``). Globs are ``fnmatch`` patterns.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # the environment hook may import this at interpreter start
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Mapping

KINDS = ("thread", "native-thread", "native-runtime", "sqlite-connection", "event-loop",
         "preexec-fn", "*")
FIELDS = ("name", "started_in", "runtime")

BAD_RULE = "{source}: cannot read the accept rule {text!r}: {problem}"
FORM = "expected KIND[/FIELD=GLOB]...: REASON, e.g. 'thread/name=cache-*: joined before forking'"


class AcceptError(ValueError):
    """A rule that cannot be read; the message names its source."""


class Rule:
    """One accepted hazard: its kind, what narrows it down, and why it is fine."""

    __slots__ = ("fields", "kind", "reason", "source")

    def __init__(self, kind: str, reason: str, *, source: str,
                 name: str | None = None, started_in: str | None = None,
                 runtime: str | None = None) -> None:
        if kind not in KINDS:
            raise AcceptError(f"{source}: unknown hazard kind {kind!r}; expected one of: "
                              f"{', '.join(KINDS)}")
        if not isinstance(reason, str) or not reason.strip():
            raise AcceptError(f"{source}: an accept rule needs a reason (why is it fine?)")
        self.kind = kind
        self.reason = reason.strip()
        self.source = source
        self.fields = {key: value for key, value in
                       (("name", name), ("started_in", started_in), ("runtime", runtime))
                       if value is not None}

    def __repr__(self) -> str:
        return f"Rule({self.text()!r}, source={self.source!r})"

    def text(self) -> str:
        """The rule in its text form."""
        fields = "".join(f"/{key}={value}" for key, value in self.fields.items())
        return f"{self.kind}{fields}: {self.reason}"

    def matches(self, kind: str, evidence: Mapping[str, Any]) -> bool:
        if self.kind not in ("*", kind):
            return False
        import fnmatch

        for key, pattern in self.fields.items():
            if not any(fnmatch.fnmatchcase(value, pattern) for value in _values(key, evidence)):
                return False
        return True


def _values(key: str, evidence: Mapping[str, Any]) -> list[str]:
    if key == "name":
        name = evidence.get("name", evidence.get("thread"))
        return [name] if isinstance(name, str) else []
    if key == "runtime":
        runtime = evidence.get("runtime")
        return [runtime] if isinstance(runtime, str) else []
    from collections.abc import Mapping as AnyMapping

    modules = []
    target = evidence.get("target")
    if isinstance(target, str):
        modules.append(target.rpartition(".")[0] or target)
    started = evidence.get("started_at")
    for site in started if isinstance(started, list) else []:
        if isinstance(site, AnyMapping) and isinstance(site.get("file"), str):
            module = module_of(site["file"])
            if module:
                modules.append(module)
    # A module glob also matches the modules it is a package of: "otel.*" and "otel".
    return modules + [m.rpartition(".")[0] for m in modules if "." in m]


def module_of(path: str) -> str | None:
    """The dotted module a source file is imported as, from ``sys.path`` (None: unknown)."""
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or "."), "")
        if path.startswith(root) and len(root) > len(best):
            best = root
    if not best:
        return None
    relative = path[len(best):]
    if not relative.endswith(".py"):
        return None
    parts = relative[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or None


def parse(text: str, source: str) -> list[Rule]:
    """Rules in their text form, several separated by ``;``."""
    return [_parse_one(part.strip(), source) for part in text.split(";") if part.strip()]


def _parse_one(text: str, source: str) -> Rule:
    head, sep, reason = text.partition(":")
    if not sep:
        raise AcceptError(BAD_RULE.format(source=source, text=text, problem=FORM))
    kind, *pairs = (p.strip() for p in head.split("/"))
    fields: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or key not in FIELDS or not value.strip():
            problem = f"{pair!r} is not FIELD=GLOB with FIELD one of: {', '.join(FIELDS)}"
            raise AcceptError(BAD_RULE.format(source=source, text=text, problem=problem))
        fields[key] = value.strip()
    try:
        return Rule(kind, reason, source=source, **fields)
    except AcceptError as exc:
        raise AcceptError(BAD_RULE.format(source=source, text=text, problem=_tail(exc))) \
            from None


def _tail(exc: Exception) -> str:
    return str(exc).partition(": ")[2] or str(exc)


def from_table(entries: object, source: str) -> list[Rule]:
    """The ``accept`` list of ``[tool.forksafe]``: text forms and tables."""
    if not isinstance(entries, list):
        raise AcceptError(f"{source}: 'accept' must be a list of rules")
    rules: list[Rule] = []
    for entry in entries:
        if isinstance(entry, str):
            rules.extend(parse(entry, source))
        elif isinstance(entry, dict):
            unknown = set(entry) - {"kind", "reason", *FIELDS}
            if unknown:
                raise AcceptError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} in "
                                  f"an accept rule; expected kind, reason, {', '.join(FIELDS)}")
            values = {k: entry[k] for k in FIELDS if k in entry}
            if not all(isinstance(v, str) for v in values.values()):
                raise AcceptError(f"{source}: accept rule fields must be strings")
            rules.append(Rule(str(entry.get("kind", "")), entry.get("reason", ""),
                              source=source, **values))
        else:
            raise AcceptError(f"{source}: an accept rule is a string or a table")
    return rules


PYPROJECT = "pyproject.toml"
NO_TOML = ("{path}: [tool.forksafe] is read with Python 3.11's tomllib or the tomli package; "
           "neither is available, so its rules are not used")


def find_pyproject(start: str | None = None) -> str | None:
    """The nearest ``pyproject.toml`` from ``start`` (the working directory) upwards."""
    directory = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(directory, PYPROJECT)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def project_settings(path: str) -> dict[str, Any]:
    """``[tool.forksafe]`` of a ``pyproject.toml`` (empty when it has none).

    A file that never says "forksafe" has no such table, however it is written: it
    is not parsed (the TOML parser's import is a sixth of ``forksafe run``'s start).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise AcceptError(f"{path}: cannot read it: {exc}") from None
    if b"forksafe" not in raw:
        return {}
    try:
        import tomllib as toml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            import tomli as toml  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            raise AcceptError(NO_TOML.format(path=path)) from None
    try:
        data = toml.loads(raw.decode("utf-8"))
    except ValueError as exc:  # a TOML error, or not UTF-8
        raise AcceptError(f"{path}: cannot read it: {exc}") from None
    tool = data.get("tool", {})
    settings = tool.get("forksafe", {}) if isinstance(tool, dict) else {}
    if not isinstance(settings, dict):
        raise AcceptError(f"{path}: [tool.forksafe] must be a table")
    return settings


def project_rules(path: str) -> list[Rule]:
    """The ``accept`` rules of ``[tool.forksafe]`` in ``path``."""
    settings = project_settings(path)
    if "accept" not in settings:
        return []
    return from_table(settings["accept"], f"{path} [tool.forksafe]")


def command_rules(texts: Iterable[str]) -> list[Rule]:
    """The rules of a ``forksafe`` command: ``[tool.forksafe]`` of the nearest
    ``pyproject.toml``, then the ``--accept`` options (AcceptError for a bad one)."""
    path = find_pyproject()
    rules = project_rules(path) if path else []
    for text in texts:
        rules.extend(parse(text, "--accept"))
    return rules


# -- the rules in force in this process ------------------------------------------------

_rules: list[Rule] = []
#: Bumped whenever the rules change: a report graded under other rules is graded again.
version = 0
#: Called when the rules change (the guard forgets its last verdict then).
on_change: list[Callable[[], object]] = []


def add(rules: Iterable[Rule]) -> None:
    global version
    _rules.extend(rules)
    version += 1
    for call in on_change:
        call()


def clear() -> None:
    global version
    _rules.clear()
    version += 1
    for call in on_change:
        call()


def rules() -> list[Rule]:
    return list(_rules)


def accept(kind: str, *, reason: str, name: str | None = None,
           started_in: str | None = None, runtime: str | None = None) -> None:
    """Accept a hazard, with the reason it is fine: it stays in reports, graded info.

    ``kind`` is a hazard kind (``"thread"``, ``"native-runtime"``, ...); ``name``
    a glob on the thread's name, ``started_in`` one on the module it was started
    from (or its target's), ``runtime`` one on a native runtime's key. ValueError
    for a rule that cannot match anything or has no reason.
    """
    add([Rule(kind, reason, source="forksafe.accept()", name=name, started_in=started_in,
              runtime=runtime)])
