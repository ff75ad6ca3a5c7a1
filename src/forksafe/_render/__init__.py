"""The text layer: every sentence forksafe shows a person is made here.

One module per concept, one formatter per concept:

* ``sites``: a place in code (``app.py:12``, ``app.py:12 in main``) and the one
  rule that shortens a path;
* ``hazards``: a hazard, a group of alike hazards, a whole report;
* ``forks``: the warning and the refusal the guard issues for one fork;
* ``outcomes``: what became of a child: a death, a hang, and the fork it came from;
* ``runs``: the summary of a whole run, grouped.

The layer imports nothing else of forksafe: it reads the model's records through
the shapes in ``shapes`` (structural types that mypy checks against the real
classes), so that the model itself can use it (``str(report)``) without an import
cycle. Operational one-liners (a bad option, a bad variable) stay with the contract
they are about (``forksafe._config``, ``forksafe._cli``).
"""
