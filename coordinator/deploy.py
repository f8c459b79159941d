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

The app bundle (FAB) and its pinned hash, shared with the nodes, live in ``node.flower_runtime``;
node keys in ``node.keys``; a whole federation on this machine in ``coordinator.local_federation``.
"""

from __future__ import annotations

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

from node.flower_runtime import fab_bytes
from node.keys import write_private_key

FINISHED = "finished"


@dataclass
class CertPaths:
    """Where ``make_certificates`` put the CA and the SuperLink's server certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


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
    write_private_key(paths.ca_key, ca_key, serialization.PrivateFormat.PKCS8)
    write_private_key(paths.server_key, server_key, serialization.PrivateFormat.PKCS8)
    return paths


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


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


def wait_run(
    client: Any, run_id: int, timeout_s: float, poll_s: float = 0.5, outage_s: float = 120.0
) -> tuple[str, str]:
    """Wait until the run finishes; return (sub_status, details); ``TimeoutError`` otherwise.

    A SuperLink that stops answering for up to ``outage_s`` seconds (restarted, or the network
    between) is waited for: once back with its state file it still knows the run and says how
    it ended (a restart ends its ServerApp: Flower fails the run when its heartbeats stop).
    Longer, the last connection error is raised.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    lost_at: float | None = None
    while time.monotonic() < deadline:
        try:
            status, sub_status, details = run_status(client, run_id)
        except httpx.TransportError:
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > outage_s:
                raise
            time.sleep(poll_s)
            continue
        lost_at = None
        if status == FINISHED:
            return sub_status, details
        time.sleep(poll_s)
    raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s")
