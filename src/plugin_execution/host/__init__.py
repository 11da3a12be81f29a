"""The host side of the worker protocol: the host's handles on its workers.

The mirror of :mod:`plugin_execution.worker` (the child side).
"""
