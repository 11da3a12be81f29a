"""A plugin module whose import raises an exception that cannot be rendered."""

from bad_errors import StrRaisesSystemExit

raise StrRaisesSystemExit()
