"""A whole federation as real processes on this machine: a SuperLink and one SuperNode per node.

For tests, benchmarks and trials: certificates, a TLS SuperLink with SuperNode authentication,
node keys registered, one ``fedomop node start`` per policy, all on 127.0.0.1, each process in
its own session so ``kill`` takes a node down whole, as a crashed machine would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from coordinator.deploy import control_client, make_certificates, register_node
from node.flower_runtime import flower_env, free_port
from node.keys import make_node_keys


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes as real processes on this machine (tests, benchmarks, trials).

    Each process runs in its own session so that ``kill`` takes a node down whole (SuperNode and
    runner), as a crashed machine would.
    """

    root: Path
    address: str
    ca_cert: Path
    processes: dict[str, Any]
    #: This process's ``FLWR_HOME`` before the federation set its own (``stop`` restores it).
    previous_home: str | None = None
    #: The environment and command line the SuperLink was started with (``restart_superlink``).
    env: dict[str, str] = field(default_factory=dict, repr=False)
    superlink_command: list[str] = field(default_factory=list)

    def spawn(self, name: str, command: list[str]) -> Any:
        """Start ``command`` as process ``name`` in a session of its own, its output appended
        to ``root/name.log`` (a restarted process keeps its earlier log)."""
        log = (self.root / f"{name}.log").open("a")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.processes[name] = process
        return process

    def restart_superlink(self) -> None:
        """SIGKILL the SuperLink with everything it started (SuperExec, ServerApps), as a
        crashed coordinator machine, then start it again: same address, certificates and state
        file, so registered node keys and runs survive only if the state is on disk."""
        self.kill("superlink")
        self.spawn("superlink", self.superlink_command)

    def kill(self, name: str) -> None:
        """SIGKILL a node (or the SuperLink) and everything it started (its children run in
        process groups of their own, so they are found by parentage)."""
        process = self.processes.pop(name)
        children = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL after 15 s) and give this
        process back the ``FLWR_HOME`` it had."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.processes.clear()
        if self.previous_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = self.previous_home


def start_local_federation(
    root: Path,
    nodes: dict[str, Path],
    *,
    poll_s: float = 0.25,
    outbox: bool = False,
    ready_s: float = 60.0,
    state: bool = False,
) -> LocalFederation:
    """Certificates, a SuperLink (TLS + SuperNode auth), node keys registered, one
    ``fedomop node start`` per ``nodes`` entry (name -> policy TOML), all on 127.0.0.1; with
    ``state`` the SuperLink keeps its state (registered keys, runs, messages) in
    ``root/superlink.sqlite`` rather than in memory."""
    fedomop = str(Path(sys.executable).parent / "fedomop")
    env = {**flower_env(), "FLWR_HOME": str(root / "flwr_home")}
    certs = make_certificates(root / "certs", ["127.0.0.1", "localhost"])
    port = free_port()
    fed = LocalFederation(root, f"127.0.0.1:{port}", certs.ca_cert, {}, os.environ.get("FLWR_HOME"))
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]  # this process's Control API client state
    fed.env = env
    fed.superlink_command = [
        fedomop, "coordinator", "start", "--certs", str(root / "certs"), "--port", str(port),
        "--fleet-port", str(free_port()),
    ]  # fmt: skip
    if state:
        fed.superlink_command += ["--state", str(root / "superlink.sqlite")]
    fed.spawn("superlink", fed.superlink_command)
    try:
        keys = {name: make_node_keys(root / "node_keys", name) for name in nodes}
        deadline = time.monotonic() + ready_s
        for _private, public in keys.values():
            _register_when_up(fed, public, deadline)
        for name, policy in nodes.items():
            command = [
                fedomop, "node", "start", "--policy", str(policy), "--superlink", fed.address,
                "--root-cert", str(certs.ca_cert), "--auth-key", str(keys[name][0]),
                "--poll", str(poll_s),
            ]  # fmt: skip
            if outbox:
                command += ["--outbox", str(root / name / "outbox")]
            fed.spawn(name, command)
    except BaseException:
        fed.stop()
        raise
    return fed


def _register_when_up(fed: LocalFederation, public: Path, deadline: float) -> None:
    """Register a node key, retrying while the SuperLink is still starting."""
    while True:
        try:
            client = control_client(fed.address, fed.ca_cert)
            try:
                register_node(client, public)
                return
            finally:
                client.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
