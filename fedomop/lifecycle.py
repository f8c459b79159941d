"""How a ``fedomop`` command ends: signals become an exception, child processes die with it.

SIGINT and SIGTERM raise ``Interrupted`` in the main thread, so every ``finally`` and context
manager on the way out runs: a load's build folder is removed (``omop_etl.build``), a DuckDB
query in flight is interrupted (``on_interrupt``), and the processes a command started are
stopped. The console script (``fedomop.entry``) then prints one line and exits 130 (SIGINT) or
143 (SIGTERM), the shell's convention for "killed by signal N".

Child processes run in their own process group (``start_group``), so a signal to the command
does not reach them half-way, and ``stop_group`` ends each one with everything it started
(flower-superlink's flower-superexec, a SuperNode's app processes).

Standard library only: the console script installs the handlers before importing anything slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []
_hooks: list[Callable[[], None]] = []


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException like KeyboardInterrupt, so no ``except
    Exception`` swallows it, but not one, so click does not turn it into "Aborted!"."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(signum, signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _on_signal(signum: int, _frame: Any) -> None:
    first = not _received
    _received.append(signum)
    if first:
        for hook in list(_hooks):
            with contextlib.suppress(Exception):
                hook()
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Make SIGINT and SIGTERM raise ``Interrupted`` (main thread only, as Python requires)."""
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _on_signal)


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM this process received, if any: an error raised while unwinding
    from it (DuckDB's "Query interrupted") is the interruption, not a problem to report."""
    return _received[0] if _received else None


@contextlib.contextmanager
def on_interrupt(hook: Callable[[], None]) -> Iterator[None]:
    """Call ``hook`` (e.g. a DuckDB connection's ``interrupt``) when a signal arrives inside
    the block: a query runs in C and would otherwise finish before the exception is raised."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)


def start_group(command: list[str], **popen: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group (see ``stop_group``)."""
    return subprocess.Popen(command, process_group=0, **popen)


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End ``process``, its process group and every descendant: SIGTERM, SIGKILL after
    ``grace_s``. Descendants are found by parentage too, because some children detach into a
    session of their own (flower-superlink starts flower-superexec so) and a group signal
    misses them."""
    import psutil

    try:
        leader = psutil.Process(process.pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        family = []
    _signal_group(process.pid, signal.SIGTERM)
    _end(family, grace_s)
    _signal_group(process.pid, signal.SIGKILL)  # whatever of the group is left
    with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
        process.wait(timeout=10)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def wait(process: subprocess.Popen, poll_s: float = 0.2) -> int:
    """``process.wait()`` that lets a signal in: a signal the kernel hands to another thread
    does not interrupt a blocking wait, and Python runs its handler only once the main thread
    is back in the interpreter, so the wait is a short poll."""
    while process.poll() is None:
        time.sleep(poll_s)
    return process.returncode


@contextlib.contextmanager
def owned_group(command: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """``start_group`` for the block; on leaving it, however (signal, error, return), the
    group is stopped, so no child outlives the command."""
    process = start_group(command, **popen)
    try:
        yield process
    finally:
        stop_group(process)


def call_interruptibly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread while the main thread polls for it.

    Code that blocks the main thread in C (Flower's simulation waiting on Ray, a thread join)
    would hold a signal's handler off until it returns, which may be never; polling keeps the
    main thread in the interpreter, so SIGINT/SIGTERM end the command at once.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the main thread  # noqa: BLE001
            outcome["error"] = err

    worker = threading.Thread(target=work, name="fedomop-work", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def stop_descendants(grace_s: float = 10.0) -> None:
    """End every process this one started and that still runs (Ray's, a SuperNode's): the
    console script's last step, so none outlives an interrupted or failed command."""
    import psutil

    try:
        family = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    _end(family, grace_s)


def _end(family: list[Any], grace_s: float) -> None:
    """SIGTERM each process (psutil), SIGKILL those still running after ``grace_s``."""
    import psutil

    for member in family:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=10)
