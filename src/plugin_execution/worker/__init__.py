"""The worker side: a child process that speaks the protocol and runs handlers.

``python -I -m plugin_execution.worker --fd N`` runs one worker on the inherited socket ``N``.
Everything imported at start-up is the standard library and msgpack; trio is imported only
when an async handler needs it, cattrs only for typed handlers.
"""
