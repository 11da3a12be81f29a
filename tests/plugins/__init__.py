"""Plugins used by the tests: real handlers for every path the backends must handle."""
