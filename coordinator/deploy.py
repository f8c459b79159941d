"""Deployment set-up: TLS certificates, SuperNode keys, the fedomop Flower app bundle, Control API.

Key and certificate set-up (what ``fedomop coordinator certs`` and ``fedomop node keys`` write):

- The coordinator runs a certificate authority of its own (``ca.crt``/``ca.key``, keep the key
  offline) and a SuperLink server certificate signed by it (``server.pem``/``server.key``) whose
  subject alternative names list every host name or IP address nodes use to reach the SuperLink.
  Nodes receive ``ca.crt`` only and verify the SuperLink with it (``--root-certificates``).
- Each node makes an EC key pair (NIST P-384, OpenSSH format) for SuperNode authentication:
  ``<name>.key`` stays on the node, ``<name>.pub`` goes to the coordinator operator, who registers
  it with the SuperLink (``fedomop coordinator register-node``). The SuperLink then accepts only
  SuperNodes that sign their requests with a registered key.
- In a production federation a real CA (the national contact point's PKI) replaces this helper CA.

The app bundle (FAB) that ``fedomop run --superlink`` submits holds only the Flower app manifest
(``coordinator/flower_app/pyproject.toml``): both ends import their own installed fedomop code.
Its SHA-256 is the hash that nodes pin (``pinned_fab_hash``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

APP_DIR = Path(__file__).resolve().parent / "flower_app"
FINISHED = "finished"


@dataclass
class CertPaths:
    """Where ``make_certificates`` put the CA and the SuperLink's server certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: Any) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_certificates(out_dir: Path, hosts: list[str], days: int = 365) -> CertPaths:
    """A CA and a SuperLink server certificate for ``hosts`` (DNS names or IP addresses)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedomop coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    paths = CertPaths(
        out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key"
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.ca_key, ca_key, serialization.PrivateFormat.PKCS8)
    _write_key(paths.server_key, server_key, serialization.PrivateFormat.PKCS8)
    return paths


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_node_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (P-384, OpenSSH): (private key, public key)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _write_key(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def fab_bytes(app_dir: Path = APP_DIR) -> bytes:
    """The Flower app bundle built from ``app_dir`` (deterministic: sorted, fixed timestamps)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def pinned_fab_hash() -> str:
    """SHA-256 of the app bundle of this installed fedomop: the only one a node runs."""
    return hashlib.sha256(fab_bytes()).hexdigest()


def control_client(address: str, root_cert: Path | None, insecure: bool = False) -> Any:
    """A Control API client for the SuperLink at ``address`` (TLS verified with ``root_cert``)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name="fedomop",
        address=address,
        root_certificates=None if insecure or root_cert is None else str(root_cert.resolve()),
        insecure=insecure,
    )
    return init_http_client_from_connection(connection)


def register_node(client: Any, public_key: Path, name: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node id."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = load_ssh_public_key(public_key.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{public_key} is not an EC public key")
    response = client.RegisterNode(
        RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name or public_key.stem)
    )
    return int(response.node_id)


def online_nodes(client: Any) -> list[str]:
    """Names of the SuperNodes connected to the SuperLink now (by their registered name)."""
    from flwr.proto.control_pb2 import ListNodesRequest
    from flwr.supercore.constant import NodeStatus

    nodes = client.ListNodes(ListNodesRequest()).nodes_info
    return sorted(n.name or str(n.node_id) for n in nodes if n.status == NodeStatus.ONLINE)


def start_run(client: Any, run_config: dict[str, Any], fab: bytes | None = None) -> int:
    """Submit a run of the fedomop app (or ``fab``) with ``run_config``; return the run id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    content = fab if fab is not None else fab_bytes()
    request = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(content).hexdigest(), content, {})),
        override_config=user_config_to_proto(run_config),
        federation="",
    )
    return int(client.StartRun(request).run_id)


def run_status(client: Any, run_id: int) -> tuple[str, str, str]:
    """(status, sub_status, details) of a run as the SuperLink reports it."""
    from flwr.proto.control_pb2 import ListRunsRequest

    runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
    status = runs[run_id].status
    return status.status, status.sub_status, status.details


def wait_run(client: Any, run_id: int, timeout_s: float, poll_s: float = 0.5) -> tuple[str, str]:
    """Wait until the run finishes; return (sub_status, details); ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, sub_status, details = run_status(client, run_id)
        if status == FINISHED:
            return sub_status, details
        time.sleep(poll_s)
    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s")


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

    def kill(self, name: str) -> None:
        """SIGKILL a node (or the SuperLink) and everything it started (its children run in
        process groups of their own, so they are found by parentage)."""
        import os
        import signal

        import psutil

        process = self.processes.pop(name)
        children = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process still running: SIGTERM, then SIGKILL after 15 s."""
        import os
        import signal
        import subprocess

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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_local_federation(
    root: Path,
    nodes: dict[str, Path],
    *,
    poll_s: float = 0.25,
    outbox: bool = False,
    ready_s: float = 60.0,
) -> LocalFederation:
    """Certificates, a SuperLink (TLS + SuperNode auth), node keys registered, one
    ``fedomop node start`` per ``nodes`` entry (name -> policy TOML), all on 127.0.0.1."""
    import os
    import subprocess
    import sys

    from coordinator.commands import flower_env

    fedomop = str(Path(sys.executable).parent / "fedomop")
    env = {**flower_env(), "FLWR_HOME": str(root / "flwr_home")}
    certs = make_certificates(root / "certs", ["127.0.0.1", "localhost"])
    port = _free_port()

    def spawn(name: str, command: list[str]) -> Any:
        log = (root / f"{name}.log").open("w")
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    fed = LocalFederation(root, f"127.0.0.1:{port}", certs.ca_cert, {})
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]  # this process's Control API client state
    fed.processes["superlink"] = spawn(
        "superlink",
        [fedomop, "coordinator", "start", "--certs", str(root / "certs"), "--port", str(port),
         "--fleet-port", str(_free_port())],
    )  # fmt: skip
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
            fed.processes[name] = spawn(name, command)
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
