"""The same apps on Flower's deployment engine: certificates, keys, and a loopback federation.

A real federation is one SuperLink (the model owner) and one SuperNode per organisation, each on
its own machine (``docs/deployment.md``). :class:`LoopbackFederation` starts all of them as
separate processes on this machine, with TLS on every connection and SuperNode authentication,
to test a deployment end to end and to try one before going multi-machine. Flower 1.42 facts it
relies on: the SuperLink serves every API on one HTTPS port; each SuperNode needs its own local
port; SuperNode keys are EC keys in OpenSSH format, registered with ``flwr supernode register``;
``flwr run`` exits 0 even when the run failed, so the status is read with ``flwr ls``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scaleot_fed.errors import RunError
from scaleot_fed.procs import process_table

# ----------------------------------------------------------------------------- certificates


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(out: Path, name: str = "scaleot-fed test CA", days: int = 3650):
    """A self-signed certificate authority (``ca.crt``, ``ca.key``); returns (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / "ca.key", _key_pem(key))
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_certificate(out: Path, ca, hosts: list[str], days: int = 825, expired: bool = False,
                            name: str = "server") -> tuple[Path, Path]:
    """The SuperLink's certificate for ``hosts`` (DNS names or IP addresses), signed by ``ca``;
    ``expired`` makes one whose validity ended yesterday (for tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else \
        (now - dt.timedelta(days=1), now + dt.timedelta(days=days))
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(out / f"{name}.key", _key_pem(key))
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.pem", out / f"{name}.key"


def make_supernode_key(path: Path) -> Path:
    """A SuperNode's authentication key pair: ``path`` (private) and ``path.pub`` (what the model
    owner registers), EC P-384 in OpenSSH format as Flower expects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + f" {path.name}\n".encode())
    return path


def make_certificates(out: str | Path, hosts: list[str], supernodes: list[str]) -> Path:
    """Test certificates for a federation: a CA, the SuperLink's certificate for ``hosts`` and one
    key pair per SuperNode name (``keys/<name>``, ``keys/<name>.pub``). Self-signed: for tests and
    trials; production uses your organisation's CA."""
    out = Path(out)
    ca = make_ca(out)
    make_server_certificate(out, ca, hosts)
    for name in supernodes:
        make_supernode_key(out / "keys" / name)
    return out


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """Flower's executables next to this Python (they start each other by name, so that folder
    also goes first on PATH)."""
    return str(Path(sys.executable).parent / name)


class LoopbackFederation:
    """A SuperLink and SuperNodes as separate processes on loopback, TLS everywhere, SuperNodes
    authenticated by key; ``stop()`` (or leaving the ``with`` block) ends every process started.

    Parameters
    ----------
    workdir:
        Logs, Flower's home (``FLWR_HOME``: the connection config and installed apps) and state.
    certs:
        A folder made by :func:`make_certificates` (``ca.crt``, ``server.pem``, ``server.key``).
    """

    def __init__(self, workdir: str | Path, certs: str | Path, server_cert: str = "server") -> None:
        self.workdir, self.certs = Path(workdir), Path(certs)
        self.server_cert = server_cert
        self.port = free_port()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}
        self._superexec: list[int] = []
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\ninsecure = false\n')

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("RAY_ADDRESS", None)
        return env | extra

    def _start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        # Own session: the process and whatever it starts form one group we can stop together.
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this federation's SuperLink."""
        return subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start_superlink(self, timeout: float = 60) -> None:
        c = self.certs
        self.superlink = self._start("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
            "--ssl-certfile", str(c / f"{self.server_cert}.pem"), "--ssl-keyfile", str(c / f"{self.server_cert}.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
            "--isolation", "subprocess", "--disable-runtime-dependency-installation"], self.env())
        deadline = time.time() + timeout
        while True:
            if self.superlink.poll() is not None:
                raise RunError(f"the SuperLink exited ({self.superlink.returncode}); see {self.logs / 'superlink.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RunError(f"the SuperLink did not listen on port {self.port} within {timeout:.0f} s") from None
                time.sleep(0.25)
        self._superexec = _children(self.superlink.pid)

    def register(self, public_key: str | Path, name: str) -> None:
        """Admit a SuperNode: only registered keys may join (``--enable-supernode-auth``)."""
        done = self.flwr("supernode", "register", str(public_key), "local", "--name", name)
        if done.returncode != 0:
            raise RunError(f"registering {public_key} failed: {done.stdout[-400:]}{done.stderr[-400:]}")

    def start_supernode(self, name: str, key: str | Path, data_path: str | Path, root_certificates: str | Path | None = None,
                        env: dict[str, str] | None = None, retries: int | None = None) -> subprocess.Popen:
        """One organisation: its key, its own data file, its own emulator cache."""
        args = [_bin("flower-supernode"), "--root-certificates", str(root_certificates or self.certs / "ca.crt"),
                "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(key),
                "--node-config", f"data-path={json.dumps(str(data_path))}",
                "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port())]
        if retries is not None:
            args += ["--max-retries", str(retries), "--max-wait-time", "15"]
        node_env = self.env(SCALEOT_FED_EMULATOR_CACHE=str(self.workdir / "owners" / name)) | (env or {})
        self.supernodes[name] = self._start(f"supernode-{name}", args, node_env)
        return self.supernodes[name]

    def online(self) -> int:
        done = self.flwr("supernode", "ls", "local", "--format", "json")
        if done.returncode != 0:
            return 0
        return done.stdout.count('"online"')

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.online() < count:
            if time.time() > deadline:
                raise RunError(f"fewer than {count} SuperNodes online after {timeout:.0f} s; see {self.logs}")
            time.sleep(1)

    def run(self, app_dir: str | Path, run_config: dict[str, str], timeout: float = 600) -> dict:
        """``flwr run`` the app and wait for it; returns ``{"run_id", "status", "details"}``
        (``status`` is ``finished:completed`` on success)."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        started = self.flwr("run", str(app_dir), "local", "--run-config", overrides, "--format", "json")
        try:
            run_id = int(json.loads(started.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise RunError(f"flwr run did not start a run: {started.stdout[-600:]}{started.stderr[-600:]}") from None
        deadline = time.time() + timeout
        while time.time() < deadline:
            listed = self.flwr("ls", "local", "--run-id", str(run_id), "--format", "json")
            try:
                run = json.loads(listed.stdout)["runs"][0]
            except (ValueError, KeyError, IndexError):
                run = {}
            if str(run.get("status", "")).startswith("finished"):
                return {"run_id": run_id, "status": run["status"], "details": run.get("status-details", "")}
            time.sleep(2)
        return {"run_id": run_id, "status": "timeout", "details": f"not finished after {timeout:.0f} s"}

    def processes(self) -> list[str]:
        """Every live process this federation started (and their children), zombies excluded,
        as ``"pid command"``."""
        groups = {p.pid for p in [self.superlink, *self.supernodes.values()] if p is not None} | set(self._superexec)
        return [f"{p.pid} {p.cmdline[:120]}" for p in process_table() if p.group in groups and p.alive]

    def stop(self, grace: float = 10.0) -> None:
        """SuperNodes first (they leave the SuperLink cleanly), then the SuperLink; whatever is
        still alive after ``grace`` seconds (a ClientApp busy in training) is killed."""
        for proc in self.supernodes.values():
            _terminate(proc)
        if self.superlink is not None:
            self._superexec = sorted(set(self._superexec) | set(_children(self.superlink.pid)))
            _terminate(self.superlink)
        deadline = time.time() + grace
        while self.processes() and time.time() < deadline:
            time.sleep(0.5)
        # Kill sweeps until nothing is left (a dying SuperExec may still spawn a child meanwhile).
        deadline = time.time() + grace
        while (left := self.processes()) and time.time() < deadline:
            for entry in left:
                try:
                    os.kill(int(entry.split()[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for proc in [self.superlink, *self.supernodes.values()]:
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    return [p.pid for p in process_table() if p.parent == pid]


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
