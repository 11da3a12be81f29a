"""The execution backends: where a handler runs is a configuration choice."""
