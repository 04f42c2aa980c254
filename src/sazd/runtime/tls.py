"""Certificates for the encrypted data plane (``tls=True`` or a directory).

A cluster's certificates are made per cluster (a fresh CA, one master and one worker certificate,
EC P-256, with the ``openssl`` command line) or read from a user's directory holding ``ca.pem``,
``master.pem``, ``master.key``, ``worker.pem`` and ``worker.key``. Both ends of every connection
present a certificate signed by the cluster's CA (mutual authentication) over TLS 1.3, with the
standard library's ``ssl``: encryption and integrity come from OpenSSL, not from code of ours.
The worker's certificate and key reach the worker with its start-up call (Ray's control plane).
"""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FILES = ("ca.pem", "master.pem", "master.key", "worker.pem", "worker.key")
_OPENSSL_S = 30.0


@dataclass(frozen=True)
class Identity:
    """What one end needs: the cluster's CA and its own certificate and key (PEM text)."""

    ca: str
    cert: str
    key: str

    def context(self, server: bool) -> ssl.SSLContext:
        """A TLS 1.3 context that presents this identity and requires a peer signed by the CA (made
        once per identity and side)."""
        return _context(self, server)


@functools.lru_cache(maxsize=16)
def _context(identity: Identity, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is named by the cluster's own CA, not by a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=identity.ca)
    if server:
        ctx.num_tickets = 0  # no session resumption: nothing to send after the handshake
    with tempfile.TemporaryDirectory(prefix="sazd-tls-") as tmp:  # 0700, removed at once
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_text(identity.cert)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(identity.key)
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass(frozen=True)
class ClusterCerts:
    """The master's and the workers' identities of one cluster, and where they came from."""

    master: Identity
    worker: Identity
    source: str  # "generated" or the directory read

    @classmethod
    def resolve(cls, tls: bool | str | os.PathLike | None) -> ClusterCerts | None:
        """None for no TLS (``None``/``False``), fresh certificates for ``True``, else the directory."""
        if tls is None or tls is False:
            return None
        if tls is True:
            return cls.generate()
        if isinstance(tls, str | os.PathLike):
            return cls.load(Path(tls))
        raise ValueError(f"tls must be None, False, True or a directory of certificates, got {tls!r}")

    @classmethod
    def load(cls, folder: Path) -> ClusterCerts:
        """Read a user's certificates; ValueError naming what is missing or unusable."""
        if not folder.is_dir():
            raise ValueError(f"tls={str(folder)!r}: not a directory; give a directory holding "
                             f"{', '.join(FILES)} (or tls=True to make certificates per cluster)")
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"tls={str(folder)!r}: missing {', '.join(missing)} (need {', '.join(FILES)})")
        text = {name: (folder / name).read_text() for name in FILES}
        certs = cls(Identity(text["ca.pem"], text["master.pem"], text["master.key"]),
                    Identity(text["ca.pem"], text["worker.pem"], text["worker.key"]), str(folder))
        for role, identity in (("master", certs.master), ("worker", certs.worker)):
            try:
                identity.context(server=role == "worker")
            except (ssl.SSLError, OSError, ValueError) as err:
                raise ValueError(f"tls={str(folder)!r}: the {role} certificate or key is unusable: "
                                 f"{err}") from None
        return certs

    @classmethod
    def generate(cls) -> ClusterCerts:
        """A fresh CA and master/worker certificates (``openssl`` command line), valid 30 days."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ValueError("tls=True needs the `openssl` command to make certificates; install it, "
                             f"or give tls=<directory> holding {', '.join(FILES)}")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        with tempfile.TemporaryDirectory(prefix="sazd-ca-") as tmp:
            def run(*args: str) -> None:
                done = subprocess.run([openssl, *args], cwd=tmp, capture_output=True, text=True,
                                      timeout=_OPENSSL_S, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")

            run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
                "-subj", "/CN=sazd-cluster-ca")
            for role in ("master", "worker"):
                run("req", *ec, "-keyout", f"{role}.key", "-out", f"{role}.csr", "-subj", f"/CN=sazd-{role}")
                run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{role}.pem", "-days", "30")
            text = {name: Path(tmp, name).read_text() for name in FILES}
        return cls(Identity(text["ca.pem"], text["master.pem"], text["master.key"]),
                   Identity(text["ca.pem"], text["worker.pem"], text["worker.key"]), "generated")
