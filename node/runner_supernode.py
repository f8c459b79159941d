"""Flower's SuperNode with a shorter idle poll: ``python -m node.runner_supernode <flower args>``.

Flower's SuperNode loop sleeps 3 s whenever the SuperLink has no message for it, and waits for a
reply in 0.5 s steps, so every federated round costs up to 3.5 s of waiting on each node. A study
is a chain of short rounds (GLM: one per Newton step), so ``fedomop node start`` runs the same
SuperNode with those waits capped at ``FEDOMOP_SUPERNODE_POLL_S`` seconds (default 0.25). Only the
SuperNode loop's sleeps change: the module's reference to ``time`` is replaced by a view of
``time`` whose ``sleep`` is capped; everything else is Flower's own code.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.supernode import start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode

POLL_ENV = "FEDOMOP_SUPERNODE_POLL_S"


class _CappedSleep:
    """``time`` with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def main() -> None:
    """Run ``flower-supernode`` (same arguments) with the capped idle poll."""
    start_client_internal.time = _CappedSleep(float(os.environ.get(POLL_ENV, "0.25")))
    flower_supernode()


if __name__ == "__main__":
    main()
