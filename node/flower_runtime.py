"""What both ends of a Flower federation share: the process environment and the pinned app bundle.

A leaf module (no fedomop imports) so that the node and the coordinator take the same Flower
settings and the same FAB hash without the node importing coordinator code:

- ``FLOWER_ENV``: no telemetry, no update check (the project's rule wherever Flower runs), and a
  short SuperExec poll so a submitted run starts within 0.1 s.
- The app bundle (FAB) that ``fedomop run --superlink`` submits holds only the Flower app manifest
  (``coordinator/flower_app/pyproject.toml``, package data read by path, not imported): both ends
  import their own installed fedomop code. Its SHA-256 is the hash nodes pin (``pinned_fab_hash``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent / "coordinator" / "flower_app"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # the SuperLink's SuperExec looks for a new run (a ServerApp to start) every 0.1 s, not 1 s
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def flower_env() -> dict[str, str]:
    """The environment for Flower child processes: ``FLOWER_ENV`` and this venv's tools first."""
    env = {**os.environ, **FLOWER_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def use_flower_env(*, override: bool = True) -> None:
    """Set ``FLOWER_ENV`` in this process (before Flower runs in it); with ``override=False``
    a value the user already set is kept (simulation, benchmarks)."""
    for key, value in FLOWER_ENV.items():
        if override:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local SuperLink, SuperNode or Runtime API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fab_bytes(app_dir: Path = APP_DIR) -> bytes:
    """The Flower app bundle built from ``app_dir`` (deterministic: sorted, fixed timestamps)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def pinned_fab_hash() -> str:
    """SHA-256 of the app bundle of this installed fedomop: the only one a node runs."""
    return hashlib.sha256(fab_bytes()).hexdigest()
