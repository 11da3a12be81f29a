"""The version of plugin-execution (re-exported as ``plugin_execution.__version__``).

A module of its own so that modules of the package can read it without importing the
package root, which re-exports every module.
"""

__version__ = "0.1.0"
