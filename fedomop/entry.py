"""The ``fedomop`` console script: signal handlers first, then the command.

The handlers are installed before ``fedomop.cli`` (and its heavy imports) loads, so a Ctrl-C
at any moment ends with one line and exit status 130, never a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import os
import sys

from fedomop.lifecycle import (
    SIGNAL_NAMES,
    Interrupted,
    install_signal_handlers,
    received_signal,
    stop_descendants,
)


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
    finally:
        stop_descendants()  # after an error too: no process outlives the command


def _interrupted(signum: int | None) -> None:
    """One line, no process left, exit 128 + signal at once: threads still blocked in what
    the signal interrupted (a Ray driver) must not hold the exit up."""
    from fedomop.ui import interrupted_line

    assert signum is not None
    stop_descendants()
    interrupted_line(SIGNAL_NAMES.get(signum, str(signum)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    main()
