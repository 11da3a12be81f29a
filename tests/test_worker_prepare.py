"""What a child forked ahead does before its execution is known (``worker/bootstrap.py``),
run here in the test process: it must leave no trace a handler could see."""

from __future__ import annotations

import sys

from plugin_execution.worker import bootstrap


def test_the_rehearsed_import_leaves_no_trace() -> None:
    """The rehearsal loads a handler of ours by path, then forgets it: ``sys.path``, the
    finders' cache and ``sys.modules`` are as they were (the package's own module, imported
    under its full name, is not touched)."""
    path = list(sys.path)
    finders = dict(sys.path_importer_cache)
    modules = set(sys.modules)
    bootstrap._rehearse_import()
    assert sys.path == path
    assert "_rehearsal" not in sys.modules
    assert set(sys.modules) - modules <= {"plugin_execution.handlers"}
    assert set(sys.path_importer_cache) - set(finders) == set()
