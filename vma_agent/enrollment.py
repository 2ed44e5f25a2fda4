"""Pairing this agent with an OMA (docs/design/enrollment.md#agent-side).

The original held one HTTP request open for up to ten minutes, stored the private key as raw bytes, sent a
placeholder fingerprint (its script even a fake signature) and left the tunnel as placeholders (E-2, E-9).
This flow:

* generates an Ed25519 key; the private half is stored in OpenSSH format (0600) in a private directory
  (0700), the fingerprint is the real ``SHA256:`` of the key blob;
* reaches the OMA's public EnrollmentService through the generated stubs — plaintext in the lab, or TLS
  trusting only the certificate whose SHA-256 the operator pinned (E-8);
* calls Enroll at once (a wrong pairing code is an immediate answer), then in the background signs the
  decoded challenge, calls VerifyChallenge and polls GetEnrollmentResult until the operator decides or the
  OMA expires the enrollment;
* saves its state (``state.json``, 0600) after every step and resumes from it when the agent restarts;
* on approval pins the OMA's SSH host key fingerprint and writes ``enrollment-<id>.json``, the tunnel's ssh
  configuration and its command line; then :mod:`vma_agent.tunnel` keeps the tunnel up (known_hosts from
  the pinned fingerprint, ssh restarted when it ends) and sets ``tunnel_configured`` once the OMA confirms
  it reached this agent through the tunnel. With ``tunnel_enabled`` off the files are written and the
  operator runs the command.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import shlex
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from oma.v1 import enrollment_pb2, enrollment_pb2_grpc

from server_kit.private_files import write_private
from server_kit.settings import is_loopback_host
from vma_agent import errors, validation
from vma_agent.config import Settings
from vma_agent.integrations import ssh_tunnel
from vma_agent.tunnel import SSH_CONFIG_FILE, TunnelCheckError, TunnelKeeper, TunnelView

log = logging.getLogger("vma_agent.enrollment")

KEYS_GENERATED, ENROLLED, VERIFIED, AWAITING_APPROVAL = "keys_generated", "enrolled", "verified", "awaiting_approval"
APPROVED, REJECTED, EXPIRED, FAILED = "approved", "rejected", "expired", "failed"
IN_PROGRESS = (KEYS_GENERATED, ENROLLED, VERIFIED, AWAITING_APPROVAL)

DEFAULT_OMA_PORT = 443
STATE_FILE, PRIVATE_KEY_FILE = "state.json", "id_ed25519"
PUBLIC_KEY_FILE, COMMAND_FILE = "id_ed25519.pub", "tunnel.command"
_CODE = re.compile(r"^[A-Z0-9]{4}-?[A-Z0-9]{4}-?[A-Z0-9]{4}$")
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MAX_BACKOFF_SECONDS = 60.0


@dataclass
class Record:
    """The saved state of this agent's enrollment (``state.json``)."""

    state: str
    message: str = ""
    oma_host: str = ""
    oma_port: int = DEFAULT_OMA_PORT
    oma_certificate_sha256: str = ""
    vma_name: str = ""
    vma_version: str = ""
    vma_fingerprint: str = ""
    public_key: str = ""
    # Kept only until the OMA accepted it (a restart before that retries Enroll with it).
    pairing_code: str = ""
    enrollment_id: str = ""
    # Kept only until verified (a restart before that signs it again).
    challenge: str = ""
    ssh_user: str = ""
    ssh_port: int = 0
    ssh_options: str = ""
    host_key_hash: str = ""
    reverse_tunnel_port: int = 0
    tunnel_configured: bool = False
    enrolled_at: str = ""
    updated_at: str = ""


class _Transient(Exception):
    """The OMA could not be reached or asked to slow down: try again later."""


class _Stopped(Exception):
    """The agent is stopping; leave the state as it is."""


def _said(exc: grpc.RpcError) -> str:
    """What the OMA said in an error status, safe to store and log."""
    return validation.oma_message(exc.details() or "")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _certificate_name(der: bytes) -> str | None:
    """A DNS name (or the common name) of the certificate, to check the TLS session against it."""
    cert = x509.load_der_x509_certificate(der)
    with contextlib.suppress(x509.ExtensionNotFound):
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else None


def open_channel(host: str, port: int, certificate_sha256: str, timeout: float) -> grpc.Channel:
    """A channel to the OMA: plaintext without a pin; with one, TLS trusting only the certificate the OMA
    presents if its SHA-256 is the pinned one (a self-signed appliance certificate)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not certificate_sha256:
        return grpc.insecure_channel(target)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except OSError as exc:
        raise _Transient(f"cannot read the OMA's TLS certificate at {target}: {exc}") from None
    der = ssl.PEM_cert_to_DER_cert(pem)
    actual = hashlib.sha256(der).hexdigest()
    if not hmac.compare_digest(actual, certificate_sha256):
        raise errors.Unauthenticated(
            f"the OMA at {target} presents a certificate with SHA-256 {actual}, not the pinned {certificate_sha256}")
    name = _certificate_name(der)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=pem.encode()), options)


def _normalise_pin(value: str) -> str:
    pin = value.strip().replace(":", "").lower()
    if pin and (len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin)):
        raise errors.InvalidArgument("oma_certificate_sha256 must be a SHA-256 fingerprint in hex (colons allowed)")
    return pin


class Enrollment:
    """This agent's one enrollment: started by :meth:`enroll`, continued by a background worker, read by
    :meth:`status`; resumed from the enrollment directory when the agent starts."""

    def __init__(self, settings: Settings):
        self._dir = Path(settings.enrollment_dir)
        self._poll_interval = settings.enrollment_poll_interval_seconds
        self._timeout = settings.enrollment_call_timeout_seconds
        self._agent_port = int(settings.listen.rpartition(":")[2] or 0)
        self._record_lock = threading.Lock()  # the record and its file
        self._flow_lock = threading.Lock()  # one Enroll at a time
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._worker: threading.Thread | None = None
        self._record = self._load()
        self._keeper = TunnelKeeper(
            self, restart_delay=settings.tunnel_restart_delay_seconds,
            check_interval=settings.tunnel_check_interval_seconds,
            keyscan_timeout=settings.enrollment_call_timeout_seconds) if settings.tunnel_enabled else None
        if self._record is not None and self._record.state in IN_PROGRESS:
            log.info("resuming enrollment with %s (state %s)", self._record.oma_host, self._record.state)
            self._start_worker()
        elif self._record is not None and self._record.state == APPROVED and self._restore_tunnel_files() \
                and self._keeper is not None:
            self._keeper.start()

    # --- state -----------------------------------------------------------------------------------------

    def _load(self) -> Record | None:
        try:
            data = json.loads((self._dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("cannot read the enrollment state in %s (%s); enroll again", self._dir, exc)
            return None
        known = {f.name for f in dataclasses.fields(Record)}
        return Record(**{k: v for k, v in data.items() if k in known})

    def status(self) -> Record | None:
        with self._record_lock:
            return dataclasses.replace(self._record) if self._record is not None else None

    def _save(self, record: Record) -> None:
        record.updated_at = _now()
        write_private(self._dir / STATE_FILE, json.dumps(dataclasses.asdict(record), indent=2) + "\n")
        self._record = record

    def _update(self, **changes: object) -> Record:
        with self._record_lock:
            record = dataclasses.replace(self._record, **changes)
            self._save(record)
            return dataclasses.replace(record)

    # --- what the tunnel keeper uses --------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    def approved_record(self) -> Record | None:
        record = self.status()
        return record if record is not None and record.state == APPROVED else None

    def record_tunnel(self, configured: bool, message: str) -> None:
        with self._record_lock:
            record = self._record
            if record is None or record.state != APPROVED or (record.tunnel_configured, record.message) == (
                    configured, message):
                return
            self._save(dataclasses.replace(record, tunnel_configured=configured, message=message))

    def write_private_file(self, name: str, text: str) -> None:
        write_private(self._dir / name, text)

    def tunnel_result(self) -> TunnelView:
        """What the OMA says about this agent's tunnel (GetEnrollmentResult)."""
        record = self.status()
        try:
            response = self._call("GetEnrollmentResult", enrollment_pb2.GetEnrollmentResultRequest(
                enrollment_id=record.enrollment_id))
        except (_Transient, _Stopped) as exc:
            raise TunnelCheckError(f"the OMA could not be asked about the tunnel: {exc}") from None
        except grpc.RpcError as exc:
            raise TunnelCheckError(f"the OMA refused to report on the tunnel: {_said(exc)}") from None
        except errors.AgentError as exc:  # e.g. the pinned TLS certificate no longer matches
            raise TunnelCheckError(exc.message) from None
        try:
            seen = response.tunnel_last_seen_at.ToDatetime(UTC) if response.HasField("tunnel_last_seen_at") else None
        except (ValueError, OverflowError):  # a timestamp no clock can show
            raise TunnelCheckError("the OMA reported an impossible tunnel_last_seen_at") from None
        return TunnelView(tunnel_last_seen_at=seen, access_revoked=response.access_revoked)

    # --- starting --------------------------------------------------------------------------------------

    def enroll(self, *, oma_host: str, oma_port: int, pairing_code: str, vma_name: str, vma_version: str,
               oma_certificate_sha256: str) -> Record:
        """Generate the key and enroll with the OMA now; verification and waiting continue in the background."""
        oma_host, code = oma_host.strip(), pairing_code.strip().upper()
        if not oma_host:
            raise errors.InvalidArgument("oma_host is required (a host name or address)")
        validation.host("oma_host", oma_host)  # it becomes the tunnel's HostName and an ssh-keyscan argument
        if not code:
            raise errors.InvalidArgument("pairing_code is required")
        if not _CODE.match(code):
            raise errors.InvalidArgument("pairing_code must look like XXXX-XXXX-XXXX")
        oma_port = oma_port or DEFAULT_OMA_PORT
        if not 0 < oma_port < 65536:
            raise errors.InvalidArgument("oma_port must be 1–65535")
        pin = _normalise_pin(oma_certificate_sha256)
        vma_name = vma_name.strip() or f"vma-{secrets.token_hex(3)}"
        if len(vma_name) > 255 or not vma_name.isprintable() or len(vma_version) > 255 or not vma_version.isprintable():
            raise errors.InvalidArgument("vma_name and vma_version must be printable and at most 255 characters")
        with self._flow_lock:
            current = self.status()
            if current is not None and current.state in IN_PROGRESS:
                raise errors.FailedPrecondition(
                    f"an enrollment with {current.oma_host} is in progress (state {current.state})")
            if current is not None and current.state == APPROVED:
                raise errors.FailedPrecondition(
                    f"this agent is enrolled with {current.oma_host} (enrollment {current.enrollment_id}); "
                    f"remove {self._dir / STATE_FILE} to enroll again")
            self._stop_worker()
            self._stop.clear()
            public_key = self._generate_key(vma_name)
            with self._record_lock:
                self._save(Record(
                    state=KEYS_GENERATED, message="key generated; enrolling", oma_host=oma_host, oma_port=oma_port,
                    oma_certificate_sha256=pin, vma_name=vma_name, vma_version=vma_version.strip(),
                    vma_fingerprint=fingerprint(public_key), public_key=public_key, pairing_code=code))
            try:
                self._enroll_call()
            except (_Transient, _Stopped) as exc:
                record = self._update(state=FAILED, pairing_code="", message=f"the OMA could not be reached: {exc}")
                raise errors.Unavailable(record.message) from None
            self._start_worker()
            return self.status()

    def _generate_key(self, vma_name: str) -> str:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)
            key = ed25519.Ed25519PrivateKey.generate()
            write_private(self._dir / PRIVATE_KEY_FILE, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption()).decode())
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            line = f"{public.decode()} vma-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in vma_name)}"
            write_private(self._dir / PUBLIC_KEY_FILE, line + "\n")
        except OSError as exc:
            raise errors.FailedPrecondition(f"cannot write the enrollment directory {self._dir}: {exc}") from None
        return line

    # --- talking to the OMA ----------------------------------------------------------------------------

    def _stub(self) -> enrollment_pb2_grpc.EnrollmentServiceStub:
        if self._channel is None:
            record = self.status()
            self._channel = open_channel(record.oma_host, record.oma_port, record.oma_certificate_sha256,
                                         self._timeout)
        return enrollment_pb2_grpc.EnrollmentServiceStub(self._channel)

    def _call(self, name: str, request):
        try:
            return getattr(self._stub(), name)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            if self._stop.is_set():
                raise _Stopped() from None
            if exc.code() in _TRANSIENT:
                raise _Transient(f"{name}: {exc.code().name}: {_said(exc)}") from None
            raise

    def _fail(self, message: str) -> Record:
        log.warning("enrollment failed: %s", message)
        return self._update(state=FAILED, message=message, pairing_code="", challenge="")

    def _enroll_call(self) -> None:
        record = self.status()
        try:
            response = self._call("Enroll", enrollment_pb2.EnrollRequest(
                pairing_code=record.pairing_code, vma_public_key=record.public_key, vma_name=record.vma_name,
                vma_version=record.vma_version, vma_fingerprint=record.vma_fingerprint))
        except errors.Unauthenticated as exc:  # the pinned certificate does not match
            raise errors.Unauthenticated(self._fail(exc.message).message) from None
        except grpc.RpcError as exc:
            raise errors.Unauthenticated(self._fail(f"the OMA refused the enrollment: {_said(exc)}").message) \
                from None
        if response.vma_fingerprint != record.vma_fingerprint:
            raise errors.Unauthenticated(self._fail(
                f"the OMA computed fingerprint {validation.quote(response.vma_fingerprint)} for key "
                f"{record.vma_fingerprint}").message)
        try:  # the id names a file (enrollment-<id>.json); the challenge is signed with the agent's key
            validation.identifier("enrollment_id", response.enrollment_id, max_length=64)
            validation.challenge("challenge", response.challenge)
        except validation.Invalid as exc:
            raise errors.FailedPrecondition(self._fail(
                f"refused the OMA's answer to Enroll: {exc.message}; enrollment ended").message) from None
        self._update(state=ENROLLED, enrollment_id=response.enrollment_id, challenge=response.challenge,
                     pairing_code="", message="enrolled; proving possession of the key")
        log.info("enrolled with %s as %s (enrollment %s)", record.oma_host, record.vma_name, response.enrollment_id)

    def _verify(self) -> None:
        record = self.status()
        key = serialization.load_ssh_private_key((self._dir / PRIVATE_KEY_FILE).read_bytes(), password=None)
        signature = key.sign(base64.b64decode(record.challenge))
        try:
            response = self._call("VerifyChallenge", enrollment_pb2.VerifyChallengeRequest(
                enrollment_id=record.enrollment_id, signature=base64.b64encode(signature).decode()))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # verified before a restart, or expired
                self._update(state=VERIFIED, challenge="", message=_said(exc))
            else:
                self._fail(f"the OMA refused the verification: {_said(exc)}")
            return
        if response.status == AWAITING_APPROVAL:
            self._update(state=VERIFIED, challenge="", message=validation.oma_message(response.message))
        elif response.status == REJECTED:
            self._update(state=REJECTED, challenge="", message=validation.oma_message(response.message))
        else:
            self._fail(f"the OMA did not accept the signature: {validation.oma_message(response.message)}")

    def _poll(self) -> bool:
        """Ask for the result once; True when still waiting."""
        record = self.status()
        try:
            response = self._call("GetEnrollmentResult", enrollment_pb2.GetEnrollmentResultRequest(
                enrollment_id=record.enrollment_id))
        except grpc.RpcError as exc:
            self._fail(f"the OMA cannot report on enrollment {record.enrollment_id}: {_said(exc)}")
            return False
        if response.status == APPROVED:
            self._approved(response)
        elif response.status in (REJECTED, EXPIRED):
            self._update(state=response.status, message=validation.oma_message(response.message))
            log.warning("enrollment %s %s: %s", record.enrollment_id, response.status,
                        validation.oma_message(response.message))
        elif response.status == AWAITING_APPROVAL:
            if record.state != AWAITING_APPROVAL:
                self._update(state=AWAITING_APPROVAL, message=validation.oma_message(response.message))
            return True
        else:
            self._fail(f"the OMA reports enrollment {record.enrollment_id} as "
                       f"{validation.quote(response.status)} after verification")
        return False

    # --- approval: pin the host key, write the tunnel's files --------------------------------------------

    def _approved(self, response: enrollment_pb2.GetEnrollmentResultResponse) -> None:
        record = self.status()
        if not (response.ssh_user and response.host_key_hash and response.reverse_tunnel_port):
            self._fail(f"approved without tunnel parameters: {validation.oma_message(response.message)}")
            return
        try:  # every value of the answer that reaches a file or ssh is checked before anything is written
            tunnel = validation.tunnel_parameters(
                ssh_user=response.ssh_user, ssh_port=response.ssh_port, ssh_options=response.ssh_options,
                host_key_hash=response.host_key_hash, reverse_tunnel_port=response.reverse_tunnel_port)
            config_text = self._tunnel_config(record, tunnel)
        except (validation.Invalid, ssh_tunnel.SshConfigError) as exc:
            self._fail(f"refused the OMA's approval of enrollment {record.enrollment_id}: {exc}; no tunnel "
                       f"file was written and ssh was not started")
            return
        enrolled_at = _now()
        config = {
            "enrollment_id": record.enrollment_id, "oma_host": record.oma_host, "oma_port": record.oma_port,
            "vma_name": record.vma_name, "vma_version": record.vma_version,
            "public_key_path": str(self._dir / PUBLIC_KEY_FILE), "private_key_path": str(self._dir / PRIVATE_KEY_FILE),
            "ssh_user": tunnel.ssh_user, "ssh_port": tunnel.ssh_port, "ssh_options": tunnel.ssh_options,
            "host_key_hash": tunnel.host_key_hash, "reverse_tunnel_port": tunnel.reverse_tunnel_port,
            "enrolled_at": enrolled_at,
        }
        write_private(self._dir / f"enrollment-{record.enrollment_id}.json", json.dumps(config, indent=2) + "\n")
        command = self._write_tunnel_files(config_text)
        with contextlib.suppress(FileNotFoundError):  # a host key pinned for an earlier enrollment
            (self._dir / "known_hosts").unlink()
        self._update(
            state=APPROVED, ssh_user=tunnel.ssh_user, ssh_port=tunnel.ssh_port, ssh_options=tunnel.ssh_options,
            host_key_hash=tunnel.host_key_hash, reverse_tunnel_port=tunnel.reverse_tunnel_port,
            enrolled_at=enrolled_at, tunnel_configured=False,
            message=("approved; starting the tunnel" if self._keeper is not None else
                     f"approved; tunnel not configured: put the OMA host key with fingerprint "
                     f"{tunnel.host_key_hash} in {self._dir / 'known_hosts'} and run: {command}"))
        log.info("enrollment %s approved; tunnel files written to %s", record.enrollment_id, self._dir)
        if self._keeper is not None:
            self._keeper.start()

    def _tunnel_config(self, record: Record, tunnel: validation.TunnelParameters) -> str:
        """The text of ``tunnel.ssh_config`` from checked values (raises SshConfigError for a value that
        cannot be written safely, e.g. a line break in the enrollment directory's path)."""
        # The VMA-side end of each forward to the OMA's NBD exports listens on loopback only, whatever host
        # the OMA names: a key option must never make this agent listen on its network.
        forwards = [(str(validation.HostPort(t.host if is_loopback_host(t.host) else "127.0.0.1", t.port)),
                     str(t)) for t in tunnel.options.permit_open]
        return ssh_tunnel.ssh_config_text(
            comments=[f"Tunnel to the OMA for enrollment {record.enrollment_id} (written by vma-agent).",
                      f"The OMA's SSH host key must have the fingerprint {tunnel.host_key_hash}."],
            directives=[
                ("HostName", record.oma_host),
                ("Port", str(tunnel.ssh_port)),
                ("User", tunnel.ssh_user),
                ("IdentityFile", str(self._dir / PRIVATE_KEY_FILE)),
                ("IdentitiesOnly", "yes"),
                ("StrictHostKeyChecking", "yes"),
                ("UserKnownHostsFile", str(self._dir / "known_hosts")),
                # Nothing from the answer may run a program or reach past the tunnel: no proxy, no local
                # commands, no agent or X11 forwarding, no shell (-N), keys only.
                ("ProxyCommand", "none"),
                ("PermitLocalCommand", "no"),
                ("ForwardAgent", "no"),
                ("ForwardX11", "no"),
                ("PasswordAuthentication", "no"),
                ("KbdInteractiveAuthentication", "no"),
                ("BatchMode", "yes"),
                ("ServerAliveInterval", "30"),
                ("ServerAliveCountMax", "3"),
                ("ExitOnForwardFailure", "yes"),
                ("RemoteForward", str(tunnel.remote_forward), f"127.0.0.1:{self._agent_port}"),
                *(("LocalForward", local, target) for local, target in forwards),
            ])

    def _write_tunnel_files(self, config_text: str) -> str:
        """Write ``tunnel.ssh_config`` and, for people, ``tunnel.command``; returns the command line."""
        write_private(self._dir / SSH_CONFIG_FILE, config_text)
        command = shlex.join(ssh_tunnel.tunnel_command(self._dir / SSH_CONFIG_FILE))
        write_private(self._dir / COMMAND_FILE, command + "\n")
        return command

    def _restore_tunnel_files(self) -> bool:
        """At start: check the saved approval again and rewrite the tunnel's ssh configuration from it, so a
        file an older agent wrote without these checks is never run. False (and the enrollment failed) when
        the saved values do not pass."""
        record = self._record
        try:
            validation.host("oma_host", record.oma_host)
            validation.identifier("enrollment_id", record.enrollment_id, max_length=64)
            tunnel = validation.tunnel_parameters(
                ssh_user=record.ssh_user, ssh_port=record.ssh_port, ssh_options=record.ssh_options,
                host_key_hash=record.host_key_hash, reverse_tunnel_port=record.reverse_tunnel_port)
            self._write_tunnel_files(self._tunnel_config(record, tunnel))
        except (validation.Invalid, ssh_tunnel.SshConfigError) as exc:
            for name in (SSH_CONFIG_FILE, COMMAND_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / name).unlink()
            with self._record_lock:
                self._save(dataclasses.replace(record, state=FAILED, tunnel_configured=False, message=(
                    f"the saved approval is not valid ({exc}); the tunnel files were removed: enroll again")))
            log.error("%s", self._record.message)
            return False
        except OSError as exc:
            log.error("cannot rewrite the tunnel files in %s: %s", self._dir, exc)
        return True

    # --- the background worker ---------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run, name="vma-enrollment", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        backoff = self._poll_interval
        while not self._stop.is_set():
            record = self.status()
            try:
                if record.state == KEYS_GENERATED:
                    self._enroll_call()
                    wait = False
                elif record.state == ENROLLED:
                    self._verify()
                    wait = False
                elif record.state in (VERIFIED, AWAITING_APPROVAL):
                    wait = self._poll()
                else:
                    return
                backoff = self._poll_interval
            except _Stopped:
                return
            except _Transient as exc:
                log.info("enrollment: %s; retrying in %.1f s", exc, backoff)
                self._update(message=f"retrying: {exc}")
                wait, backoff = True, min(backoff * 2, _MAX_BACKOFF_SECONDS)
            except errors.AgentError as exc:  # e.g. the pinned certificate no longer matches
                if self.status().state in IN_PROGRESS:
                    self._fail(exc.message)
                continue  # the loop ends on the terminal state
            except Exception as exc:  # noqa: BLE001 - a bug or a broken file: record it, do not spin
                log.exception("enrollment step %s failed", record.state)
                self._fail(f"enrollment step {record.state} failed: {exc}")
                return
            if wait and self._stop.wait(backoff):
                return

    def _stop_worker(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()  # ends a call in flight
            self._channel = None
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=self._timeout + 5)
        self._worker = None

    def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
        self._stop_worker()
