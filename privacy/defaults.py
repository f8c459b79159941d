"""Privacy defaults that several rooms and the command line share.

This module imports nothing, so a command can show a default in its help without loading the
privacy machinery (OpenDP alone takes over a second to import: it pulls in scikit-learn).
"""

DEFAULT_MIN_CELL_COUNT = 10
"""The floor everyone starts from (design: privacy defaults); policies and permits may only raise it."""
