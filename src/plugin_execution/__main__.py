"""``python -m plugin_execution``: the same command line as ``plugin-execution``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
