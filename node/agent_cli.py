"""Node agent commands: ``fedomop node keys`` and ``fedomop node start``.

``fedomop node start --policy node.toml --superlink HOST:PORT --root-cert ca.crt --auth-key
node.key`` runs a Flower SuperNode (TLS, SuperNode authentication, ``--isolation process``) and,
in this process, the pinned node runner (``node.runner``) that answers its tasks through the gate
with this node's policy and refuses app bundles other than the installed fedomop one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console

from fedomop.lifecycle import owned_group
from fedomop.ui import fail

console = Console()


def keys(
    out: Path = typer.Option(Path("keys"), help="folder for <name>.key and <name>.pub"),
    name: str = typer.Option(..., help="the node's name (file names)"),
) -> None:
    """Make this node's SuperNode authentication key pair; send <name>.pub to the coordinator.

    Example: fedomop node keys --name hospital-a --out keys
    """
    from node.keys import make_node_keys

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
    """Join a federation: a SuperNode plus the pinned runner that answers through the gate.

    A key the SuperLink has not registered is reported (no endless retries); SIGINT or SIGTERM
    stops the SuperNode too.

    Example: fedomop node start --policy node.toml --superlink coordinator.example.org:9093
    --root-cert ca.crt --auth-key keys/hospital-a.key
    """
    from flwr.supercore.exit.exit_code import ExitCode

    from node.flower_runtime import flower_env, free_port, pinned_fab_hash, use_flower_env
    from node.policy import PolicyError, load_policy
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
    port = runtime_port or free_port()
    command = supernode_command(
        superlink, port, None if insecure else root_cert, None if insecure else auth_key
    )
    use_flower_env()
    allowed = {pinned_fab_hash(), *allow_fab_hash}
    console.print(
        f"node [bold]{node_policy.node_name}[/bold] joining {superlink}; "
        f"runs only app bundle(s) {', '.join(sorted(allowed))}"
    )
    env = {**flower_env(), POLL_ENV: str(poll)}
    with owned_group(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as child:
        log = SuperNodeLog(child)
        runner = RunnerThread(f"127.0.0.1:{port}", policy.resolve(), allowed, outbox)
        # the main thread only watches: signals arrive here, and leaving this block (signal,
        # error, a child gone) stops the SuperNode with everything it started
        while child.poll() is None and runner.is_alive():
            time.sleep(0.2)
        runner.stop.set()
    log.join(timeout=5)
    if log.exit_code == ExitCode.SUPERNODE_CONNECTION_ERROR and log.unregistered:
        fail(
            f"the SuperLink at {superlink} does not know this node's key {auth_key}: ask the "
            f"coordinator operator to run `fedomop coordinator register-node "
            f"{auth_key.with_suffix('.pub').name if auth_key else 'NODE.pub'}` with its public key"
        )
    if log.exit_code == ExitCode.SUPERNODE_CONNECTION_ERROR:
        fail(f"the SuperNode could not connect to the SuperLink at {superlink}: {log.reason}")
    if runner.error is not None:
        fail(f"the node runner failed: {type(runner.error).__name__}: {runner.error}")
    if child.returncode == 0:  # Flower stops a SuperNode whose heartbeat the SuperLink refuses
        fail(
            f"the SuperLink at {superlink} no longer accepts this node (a SuperLink restarted "
            "without its state file, `fedomop coordinator start --state FILE`, forgets every "
            "registered node key): ask its operator to register this node's public key again, "
            "then start the node again"
        )
    fail(f"the SuperNode exited with code {child.returncode}: see its log above")


class SuperNodeLog(threading.Thread):
    """Pass the SuperNode's output through, remembering Flower's exit code and reason.

    flower-supernode exits with status 1 whatever went wrong; the Flower exit code (305: no
    connection to the SuperLink) and the SuperLink's error code (2004: a key it has not
    registered) are only in what it prints.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.exit_code: int | None = None
        self.reason = ""
        self.unregistered = False
        self.start()

    def run(self) -> None:
        from flwr.supercore.error.base import ApiErrorCode

        assert self.process.stdout is not None
        said: list[str] = []  # the lines after "Exit Code: N", up to a blank line
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            if match := re.search(r"Exit Code: (\d+)", line):
                self.exit_code = int(match.group(1))
            elif self.exit_code is not None and line.strip() and not self.reason:
                said.append(line.strip())
            elif said and not self.reason:
                self.reason = " ".join(said)
            if f"[code: {ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED}]" in line:
                self.unregistered = True
        self.reason = self.reason or " ".join(said)


class RunnerThread(threading.Thread):
    """The pinned node runner (``node.runner.serve``) beside the SuperNode, until ``stop``."""

    def __init__(self, address: str, policy: Path, allowed: set[str], outbox: Path | None):
        super().__init__(daemon=True)  # a runner retrying a gone SuperNode must not keep us
        self.args = (address, policy, allowed)
        self.outbox = outbox
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        from node.runner import serve

        try:
            serve(*self.args, stop=self.stop, outbox=self.outbox)
        except Exception as err:  # reported by the main thread  # noqa: BLE001
            self.error = err


def register(app: typer.Typer) -> None:
    """Attach this module's commands to ``app``."""
    app.command("keys")(keys)
    app.command("start")(start)
