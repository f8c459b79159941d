"""Node agent commands: ``fedomop node keys`` and ``fedomop node start``.

``fedomop node start --policy node.toml --superlink HOST:PORT --root-cert ca.crt --auth-key
node.key`` runs a Flower SuperNode (TLS, SuperNode authentication, ``--isolation process``) and,
in this process, the pinned node runner (``node.runner``) that answers its tasks through the gate
with this node's policy and refuses app bundles other than the installed fedomop one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console

from fedomop.ui import fail

console = Console()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keys(
    out: Path = typer.Option(Path("keys"), help="folder for <name>.key and <name>.pub"),
    name: str = typer.Option(..., help="the node's name (file names)"),
) -> None:
    """Make this node's SuperNode authentication key pair; send <name>.pub to the coordinator."""
    from coordinator.deploy import make_node_keys

    private, public = make_node_keys(out, name)
    console.print(f"private key (stays here): [bold]{private}[/bold]")
    console.print(f"public key (to the coordinator operator): [bold]{public}[/bold]")


def supernode_command(
    superlink: str,
    runtime_port: int,
    root_cert: Path | None,
    auth_key: Path | None,
) -> list[str]:
    """flower-supernode in process isolation: it launches no app code, the runner serves it."""
    command = [
        sys.executable, "-m", "node.runner_supernode",  # flower-supernode, shorter idle poll
        "--superlink", superlink,
        "--isolation", "process",
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]  # fmt: skip
    if root_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def start(
    policy: Path = typer.Option(..., help="this node's policy TOML"),
    superlink: str = typer.Option(..., help="SuperLink address host:port"),
    root_cert: Path | None = typer.Option(None, help="CA certificate of the SuperLink"),
    auth_key: Path | None = typer.Option(None, help="this node's private key (node keys)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no node auth (testing only)"),
    runtime_port: int = typer.Option(0, help="local port of the SuperNode's Runtime API"),
    allow_fab_hash: list[str] = typer.Option(
        [], help="also accept this app bundle SHA-256 (default: only the installed fedomop's)"
    ),
    outbox: Path | None = typer.Option(None, help="keep a copy of every reply this node sends"),
    poll: float = typer.Option(0.25, help="seconds the SuperNode waits between polls when idle"),
) -> None:
    """Join a federation: a SuperNode plus the pinned runner that answers through the gate."""
    from coordinator.commands import flower_env
    from coordinator.deploy import pinned_fab_hash
    from node.policy import PolicyError, load_policy
    from node.runner import serve
    from node.runner_supernode import POLL_ENV

    try:
        node_policy = load_policy(policy)
    except PolicyError as err:
        fail(str(err))
    if not insecure and (root_cert is None or auth_key is None):
        fail("give --root-cert CA.crt and --auth-key NODE.key (or --insecure for testing)")
    for path in (root_cert, auth_key):
        if path is not None and not path.is_file():
            fail(f"file not found: {path}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    port = runtime_port or _free_port()
    command = supernode_command(
        superlink, port, None if insecure else root_cert, None if insecure else auth_key
    )
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    supernode = subprocess.Popen(command, env={**flower_env(), POLL_ENV: str(poll)})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (supernode.wait(), stop.set()), daemon=True).start()
    allowed = {pinned_fab_hash(), *allow_fab_hash}
    console.print(
        f"node [bold]{node_policy.node_name}[/bold] joining {superlink}; "
        f"runs only app bundle(s) {', '.join(sorted(allowed))}"
    )
    try:
        serve(f"127.0.0.1:{port}", policy.resolve(), allowed, stop=stop, outbox=outbox)
    except KeyboardInterrupt:
        pass
    finally:
        died = supernode.poll()
        supernode.terminate()
        try:
            supernode.wait(timeout=10)
        except subprocess.TimeoutExpired:
            supernode.kill()
    if died:
        fail(f"the SuperNode exited with code {died}: see its log above")


def register(app: typer.Typer) -> None:
    """Attach this module's commands to ``app``."""
    app.command("keys")(keys)
    app.command("start")(start)
