"""A node's SuperNode authentication key pair (what ``fedomop node keys`` writes).

Each node makes an EC key pair (NIST P-384, OpenSSH format): ``<name>.key`` stays on the node,
``<name>.pub`` goes to the coordinator operator, who registers it with the SuperLink. The node
makes its own key here, so the node needs no coordinator code to join a federation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: Any) -> None:
    """Write ``key`` unencrypted in ``fmt``, readable by its owner only (mode 0600)."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_node_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (P-384, OpenSSH): (private key, public key)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    write_private_key(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public
