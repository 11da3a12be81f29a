"""The bundled example plugin ``examples.hello``, used by ``plugin-execution demo``.

Its manifest (``examples/manifest.py``) is registered through the ``plugin_execution.plugins``
entry point of this distribution, like any third-party plugin. This package itself imports
nothing, so a worker child importing ``examples.hello`` pays only for the handlers.
"""
