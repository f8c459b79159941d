"""Commands that start processes end all of them: on SIGINT, on SIGTERM, on their own errors.

Real ``fedomop coordinator start`` (flower-superlink, which starts flower-superexec in a session
of its own) and ``fedomop node start`` (a SuperNode) processes on 127.0.0.1; each test sends the
signal a user or a service manager would and checks that no child survives and the ports are free.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from coordinator.demo import DEMO_STUDY
from coordinator.deploy import control_client, make_certificates, register_node
from node.flower_runtime import free_port
from node.keys import make_node_keys

pytestmark = pytest.mark.slow
FEDOMOP = str(Path(sys.executable).parent / "fedomop")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(predicate, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmd(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _alive(processes: list[psutil.Process]) -> list[str]:
    living = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                living.append(" ".join(p.cmdline()[:3]))
        except psutil.NoSuchProcess:
            continue
    return living


class Coordinator:
    """A ``fedomop coordinator start`` with TLS and node auth, and its ports."""

    def __init__(self, root: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        self.root = root
        self.certs = make_certificates(root / "certs", list(hosts))
        self.port, self.fleet_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**ENV, "FLWR_HOME": str(root / "flwr_home")}
        self.process = subprocess.Popen(
            [FEDOMOP, "coordinator", "start", "--certs", str(root / "certs"),
             "--port", str(self.port), "--fleet-port", str(self.fleet_port)],
            stdout=(root / "superlink.log").open("w"), stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )  # fmt: skip
        # up when flower-superexec (the second process) runs and the port answers
        _wait_for(lambda: len(_descendants(self.process)) >= 2 and not _port_free(self.port),
                  "the SuperLink")  # fmt: skip

    def register(self, public: Path) -> None:
        os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]
        client = control_client(self.address, self.certs.ca_cert)
        try:
            register_node(client, public)
        finally:
            client.close()

    def demo_permit(self) -> Path:
        """A permit for the demo study at nodes ``node-a`` and ``node-b`` (none connected)."""
        from coordinator.demo import issue_permit, make_permit_body
        from studies.loading import load_study

        keys = make_permit_body(self.root / "body")
        permit = self.root / "permit.json"
        names = ["node-a", "node-b"]
        identities = {name: _identity_hex() for name in names}
        issue_permit(load_study(DEMO_STUDY), names, keys.private, permit, node_keys=identities)
        return permit

    def kill(self) -> None:
        for p in [*_descendants(self.process), psutil.Process(self.process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def coordinator(tmp_path: Path):
    started = Coordinator(tmp_path)
    yield started
    if started.process.poll() is None:
        started.kill()


def _identity_hex() -> str:
    """A node identity key as a permit binds it (64 hex digits), for nodes that never connect."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()


def _policy(root: Path) -> Path:
    from coordinator.demo import make_permit_body, write_policy

    keys = make_permit_body(root / "permit_body")
    return write_policy(root / "node", "node-a", root / "node" / "cdm.duckdb", keys.public)


def _node(coordinator: Coordinator, key: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [FEDOMOP, "node", "start", "--policy", str(_policy(coordinator.root)),
         "--superlink", coordinator.address, "--root-cert", str(coordinator.certs.ca_cert),
         "--auth-key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=coordinator.env,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_to_coordinator_start_ends_superlink_and_superexec(
    coordinator: Coordinator, signum: int, code: int
) -> None:
    children = _descendants(coordinator.process)
    names = " ".join(_cmd(p) for p in children)
    assert "flower-superlink" in names and "flower-superexec" in names
    coordinator.process.send_signal(signum)
    assert coordinator.process.wait(timeout=60) == code
    assert _alive(children) == []
    assert _port_free(coordinator.port) and _port_free(coordinator.fleet_port)
    log = (coordinator.root / "superlink.log").read_text()
    assert f"interrupted by {signal.Signals(signum).name}" in log and "Traceback" not in log


def test_node_start_with_an_unregistered_key_says_so_and_exits(coordinator: Coordinator) -> None:
    """The SuperNode exits with Flower's exit code 305 (activation refused, SuperLink error
    2004); the node names its key and the command that registers it, instead of retrying."""
    private, _public = make_node_keys(coordinator.root / "keys", "stranger")
    node = _node(coordinator, private)
    try:
        _out, err = node.communicate(timeout=120)
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == 1
    assert (
        f"error: the SuperLink at {coordinator.address} does not know this node's key {private}"
        in err
    )
    assert "fedomop coordinator register-node stranger.pub" in err


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_to_node_start_ends_the_supernode(
    coordinator: Coordinator, signum: int, code: int
) -> None:
    private, public = make_node_keys(coordinator.root / "keys", "node-a")
    coordinator.register(public)
    node = _node(coordinator, private)
    try:
        _wait_for(lambda: _descendants(node), "the SuperNode")
        time.sleep(2)  # connected and polling
        children = _descendants(node)
        assert children and node.poll() is None
        node.send_signal(signum)
        _out, err = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == code, err
    assert _alive(children) == []
    assert f"interrupted by {signal.Signals(signum).name}" in err


def _register(coordinator: Coordinator, public: Path, address: str, ca: Path) -> tuple[int, str]:
    result = subprocess.run(
        [FEDOMOP, "coordinator", "register-node", str(public), "--superlink", address,
         "--root-cert", str(ca)],
        capture_output=True, text=True, env=coordinator.env, timeout=120,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_register_node_says_plainly_why_it_failed(coordinator: Coordinator) -> None:
    _private, public = make_node_keys(coordinator.root / "keys", "hospital-a")
    ca = coordinator.certs.ca_cert
    code, out = _register(coordinator, public, coordinator.address, ca)
    assert code == 0 and "registered as SuperNode" in out, out
    code, out = _register(coordinator, public, coordinator.address, ca)  # HTTP 412
    assert code == 1 and "Traceback" not in out
    assert f"error: the SuperLink at {coordinator.address} refused {public}: Public key" in out
    wrong_port = f"127.0.0.1:{free_port()}"
    code, out = _register(coordinator, public, wrong_port, ca)
    assert code == 1 and "Traceback" not in out
    assert f"error: no SuperLink answers at {wrong_port}" in out
    other_ca = make_certificates(coordinator.root / "other", ["127.0.0.1"]).ca_cert
    code, out = _register(coordinator, public, coordinator.address, other_ca)
    assert code == 1 and "Traceback" not in out
    assert f"is not verified by --root-cert {other_ca}" in out


def test_register_node_names_a_certificate_made_for_another_host(tmp_path: Path) -> None:
    """The README's old quickstart: certificates for coordinator.example.org, then
    register-node on 127.0.0.1."""
    coordinator = Coordinator(tmp_path, hosts=("coordinator.example.org",))
    try:
        _private, public = make_node_keys(tmp_path / "keys", "hospital-a")
        code, out = _register(coordinator, public, coordinator.address, coordinator.certs.ca_cert)
    finally:
        coordinator.kill()
    assert code == 1 and "Traceback" not in out
    assert "error: the SuperLink's TLS certificate is not valid for 127.0.0.1" in out
    assert "fedomop coordinator certs --host" in out


def test_run_waits_for_expected_nodes_as_long_as_told_and_says_who_is_there(
    coordinator: Coordinator,
) -> None:
    """``--expected-nodes 2 --wait-nodes 3`` with no node connected: the wait is said, bounded
    by the option, and the run goes on (and, without nodes, exits 3: no result)."""
    permit = coordinator.demo_permit()
    result = subprocess.run(
        [FEDOMOP, "run", str(DEMO_STUDY), "--permit", str(permit), "--superlink",
         coordinator.address, "--root-cert", str(coordinator.certs.ca_cert),
         "--expected-nodes", "2", "--wait-nodes", "3", "--timeout", "5",
         "--out", str(coordinator.root / "results")],
        capture_output=True, text=True, env={**coordinator.env, "COLUMNS": "400"}, timeout=300,
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert "waiting for 2 node(s): 0 connected (none yet)" in said
    assert "0 of 2 expected node(s) connected after 3 s (--wait-nodes): going on" in said
    assert result.returncode == 3, said
    help_text = subprocess.run(
        [FEDOMOP, "run", "--help"], capture_output=True, text=True, env={**ENV, "COLUMNS": "400"}
    ).stdout
    assert "--wait-nodes" in help_text and "[default: 60.0]" in help_text


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_to_run_simulation_ends_ray(
    synthetic_node_dbs, tmp_path: Path, signum: int, code: int
) -> None:
    """Flower's simulation blocks the main thread on Ray; the signal still ends the command
    at once, and none of Ray's processes (gcs_server, raylet, workers) outlives it."""
    from _helpers import simulated_demo_nodes

    simulated_demo_nodes(tmp_path, synthetic_node_dbs)  # nodes.toml, permit.json
    run = subprocess.Popen(
        [FEDOMOP, "run", str(DEMO_STUDY), "--permit", str(tmp_path / "permit.json"),
         "--simulation", str(tmp_path / "nodes.toml"), "--out", str(tmp_path / "results")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    seen: dict[int, psutil.Process] = {}

    def ray_started() -> bool:
        seen.update({p.pid: p for p in _descendants(run)})
        return any("raylet" in _cmd(p) for p in _descendants(run))

    try:
        _wait_for(ray_started, "Ray's raylet", timeout_s=180)
        time.sleep(6)  # the driver is connected: Ray's own signal handlers would be in place
        seen.update({p.pid: p for p in _descendants(run)})
        run.send_signal(signum)
        _out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        for p in seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert run.returncode == code, err
    assert _alive(list(seen.values())) == []
    assert err.strip().splitlines()[-1] == f"interrupted by {signal.Signals(signum).name}"


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_to_run_superlink_ends_it_while_it_waits(
    coordinator: Coordinator, signum: int, code: int
) -> None:
    """``run --superlink`` waiting for nodes stops at once on a signal, one line, 130/143."""
    permit = coordinator.demo_permit()
    run = subprocess.Popen(
        [FEDOMOP, "run", str(DEMO_STUDY), "--permit", str(permit), "--superlink",
         coordinator.address, "--root-cert", str(coordinator.certs.ca_cert),
         "--expected-nodes", "2", "--wait-nodes", "600", "--out", str(coordinator.root / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=coordinator.env,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        for line in run.stdout:  # Flower's client first says which SuperLink it uses
            if "waiting for 2 node(s)" in line:
                break
        run.send_signal(signum)
        _out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == code
    assert err.strip().splitlines() == [f"interrupted by {signal.Signals(signum).name}"]
    assert _descendants(run) == []
