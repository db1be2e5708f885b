"""Throwaway certificates for the TLS tests, made with the openssl command line tool.

A CA signs a server certificate (for every address the brokers listen on) and a client
certificate; a second, unrelated CA is the "wrong CA" a client may be given by mistake.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Certificates:
    folder: Path  # ca.pem, server.pem and server.key: what scripts/rabbitmq-cluster reads

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.pem"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _new_ca(name: str, cwd: Path, cn: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS),
        *("-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.pem"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=cwd,
    )


def _signed(name: str, cwd: Path, cn: str, extensions: str) -> None:
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr"),
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", DAYS, "-out", f"{name}.pem", "-extfile", f"{name}.ext"),
        cwd=cwd,
    )


def make_certificates(folder: Path, addresses: list[str]) -> Certificates:
    """A CA, a server certificate for `addresses` (and localhost), a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    _new_ca("ca", folder, "sfsync test CA")
    _new_ca("other-ca", folder, "some other CA")
    names = ",".join(["DNS:localhost", *(f"IP:{a}" for a in addresses)])
    _signed(
        "server",
        folder,
        "sfsync test broker",
        f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n",
    )
    _signed("client", folder, "sfsync-worker", "extendedKeyUsage=clientAuth\n")
    for key in folder.glob("*.key"):
        key.chmod(0o644)  # the broker nodes read server.key; these keys protect nothing
    return Certificates(folder)
