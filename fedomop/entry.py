"""The ``fedomop`` console script: signal handlers first, then the command.

The handlers are installed before ``fedomop.cli`` (and its heavy imports) loads, so a Ctrl-C
at any moment ends with one line and exit status 130, never a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

from fedomop.lifecycle import SIGNAL_NAMES, Interrupted, install_signal_handlers, received_signal


def main() -> None:
    """Run the ``fedomop`` command; an interruption exits 128 + signal after cleaning up."""
    install_signal_handlers()
    try:
        from fedomop.cli import app

        app()
    except Interrupted as stopped:
        _interrupted(stopped.signum)
    except SystemExit:
        if received_signal() is None:
            raise
        _interrupted(received_signal())
    except BaseException:
        if received_signal() is None:
            raise
        _interrupted(received_signal())


def _interrupted(signum: int | None) -> None:
    from fedomop.ui import interrupted_line

    assert signum is not None
    interrupted_line(SIGNAL_NAMES.get(signum, str(signum)))
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
