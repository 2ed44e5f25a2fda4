"""Builds and runs the OMA gRPC server: database, keys, services, health, reflection.

``build_server`` returns a started server bound to its port (tests use port 0) and, with ``tls_listen``,
to a TLS port serving the same services (``oma_server.tls``: configured or generated certificate);
``oma_server.cli`` adds signal handling. The order is visible here: database and keys, the long-lived
parts (``oma_server.startup``, built but not running), the servicers holding them
(``oma_server.services.build_servicers``), the ports, then the parts start and the server serves.
Every service of the contract is registered: the implemented ones, the rest answer UNIMPLEMENTED
saying what is not built yet.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import oma.v1
from grpc_health.v1 import health, health_pb2

from oma_server import metrics, tls
from oma_server.config import Settings
from oma_server.db import database
from oma_server.db.migrate import migrate
from oma_server.domain import auth
from oma_server.domain.crypto import SecretBox, decode_key, load_or_create_key_file
from oma_server.domain.login_throttle import LoginThrottle, ThrottlePolicy
from oma_server.rpc import RpcInterceptor
from oma_server.services import build_servicers, service_of
from oma_server.startup import Components, build_components
from server_kit import serving
from server_kit.settings import ConfigError, is_loopback

log = logging.getLogger("oma_server")


@dataclass
class Runtime:
    """What the services share: settings and keys (the long-lived parts are in ``startup.Components``)."""

    settings: Settings
    tokens: auth.TokenAuthority
    secrets: SecretBox
    # SHA-256 of the TLS certificate ("" without a TLS port): handed out with pairing codes for pinning.
    tls_fingerprint: str = ""
    stop_event: threading.Event = field(default_factory=threading.Event)


MIN_TOKEN_SECRET_BYTES = 32


def _load_keys(settings: Settings) -> tuple[bytes, bytes]:
    if settings.production and not (settings.token_secret and settings.encryption_key):
        raise SystemExit(
            "production mode needs OMA_TOKEN_SECRET and OMA_ENCRYPTION_KEY (base64 of 32 bytes)"
        )
    for name, value in (("OMA_TOKEN_SECRET", settings.token_secret),
                        ("OMA_TOKEN_SECRET_PREVIOUS", settings.token_secret_previous)):
        if value and len(value.encode()) < MIN_TOKEN_SECRET_BYTES:
            if settings.production:
                raise SystemExit(f"production mode refuses {name} shorter than {MIN_TOKEN_SECRET_BYTES} bytes "
                                 f"(it has {len(value.encode())}): anyone could guess it and sign tokens; "
                                 "generate one with: openssl rand -base64 48")
            log.warning("%s is shorter than %d bytes: production mode would refuse it", name,
                        MIN_TOKEN_SECRET_BYTES)
    token_secret = (
        settings.token_secret.encode()
        if settings.token_secret
        else load_or_create_key_file(settings.data_dir / "token.secret")
    )
    enc_key = (
        decode_key(settings.encryption_key)
        if settings.encryption_key
        else load_or_create_key_file(settings.data_dir / "encryption.key")
    )
    return token_secret, enc_key


def _check_listen(settings: Settings) -> None:
    if settings.production and not settings.allow_plaintext_listen and not is_loopback(settings.listen):
        raise SystemExit(
            f"production mode refuses plaintext gRPC on the non-loopback address {settings.listen}: serve remote "
            "clients over TLS (OMA_TLS_LISTEN) and keep OMA_LISTEN on 127.0.0.1, or set "
            "OMA_ALLOW_PLAINTEXT_LISTEN=1 (e.g. behind a TLS-terminating proxy)"
        )


def _load_tls(settings: Settings) -> tls.TlsIdentity | None:
    if not settings.tls_listen:
        if settings.tls_cert_file or settings.tls_key_file:
            log.warning("OMA_TLS_CERT_FILE/OMA_TLS_KEY_FILE are set but OMA_TLS_LISTEN is not: TLS is off")
        return None
    try:
        return tls.load_identity(settings.tls_cert_file, settings.tls_key_file, settings.data_dir,
                                 settings.tls_listen)
    except tls.TlsConfigError as exc:
        raise SystemExit(f"cannot serve TLS on {settings.tls_listen}: {exc}") from None


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        return serving.bind(server, address, credentials)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def load_secret_box(settings: Settings) -> SecretBox:
    """The box of the configured (or, in development, generated) encryption key."""
    return SecretBox(_load_keys(settings)[1])


def prepare_database(settings: Settings, existing: Any = None, secrets: SecretBox | None = None) -> str | None:
    """Connect (or bind an already connected database), migrate (``secrets``: the key for migrations that
    rewrite secrets; default: the configured one), seed the admin user on the first start.
    Returns a generated admin password (to print once)."""
    secrets = secrets or load_secret_box(settings)
    if existing is not None:
        database.database_proxy.initialize(existing)
    else:
        database.init_database(settings.effective_db_url, pool_size=settings.db_pool_size)
    with database.db.connection_context():
        applied = migrate(database.db, secrets)
        if applied:
            log.info("database migrations applied: %s", ", ".join(applied))
        return auth.ensure_admin_user(settings.admin_password)


class _DatabaseWatch(threading.Thread):
    """Keeps the health status in step with database reachability."""

    def __init__(self, servicer: health.HealthServicer, services: list[str], stop: threading.Event):
        super().__init__(name="db-health", daemon=True)
        self._servicer, self._services, self._stop = servicer, services, stop

    def check(self) -> None:
        try:
            with database.db.connection_context():
                database.db.execute_sql("SELECT 1")
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001 - any failure means "not serving"
            log.warning("database unreachable; health is NOT_SERVING")
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._services]:
            self._servicer.set(name, status)

    def run(self) -> None:
        while not self._stop.wait(5.0):
            self.check()


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    runtime: Runtime
    components: Components
    services: list[str]
    # The TLS port and its certificate (None without tls_listen).
    tls_port: int | None = None
    tls_identity: tls.TlsIdentity | None = None

    def stop(self, grace: float | None = 2.0) -> None:
        self.runtime.stop_event.set()
        self.components.stop()
        self.server.stop(grace).wait()


def build_server(settings: Settings, existing_database: Any = None) -> RunningServer:
    """Prepare the database, register every service and start listening."""
    try:
        settings.check_serving()
    except ConfigError as exc:
        raise SystemExit(f"cannot serve: {exc}") from None
    database.secure_data_dir(settings.data_dir)
    token_secret, enc_key = _load_keys(settings)
    _check_listen(settings)
    identity = _load_tls(settings)
    box = SecretBox(enc_key)
    generated = prepare_database(settings, existing_database, box)
    if generated:
        print(f"oma-server: created user 'admin' with password: {generated}  (shown once)", flush=True)

    runtime = Runtime(
        settings=settings,
        tokens=auth.TokenAuthority(
            token_secret, settings.token_ttl_seconds,
            previous_secrets=(settings.token_secret_previous.encode(),) if settings.token_secret_previous else (),
            throttle=LoginThrottle(ThrottlePolicy(
                free_failures_per_user=settings.login_free_failures_per_user,
                free_failures_per_peer=settings.login_free_failures_per_peer,
                backoff_base_seconds=settings.login_backoff_base_seconds,
                backoff_max_seconds=settings.login_backoff_max_seconds,
                window_seconds=settings.login_failure_window_seconds)),
            cache_seconds=settings.token_revocation_cache_seconds),
        secrets=box,
        tls_fingerprint=identity.fingerprint if identity is not None else "",
    )
    server = serving.new_server(RpcInterceptor(runtime.tokens), settings.max_workers, settings.max_concurrent_rpcs)
    components = build_components(settings, runtime.secrets)
    servicers = {service_of(servicer): servicer for servicer in build_servicers(runtime, components)}
    services = serving.register_contract(server, oma.v1, servicers)
    health_servicer = serving.add_health_and_reflection(server, services)
    port = _bind(server, settings.listen)
    tls_port = None
    if identity is not None:
        credentials = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)])
        tls_port = _bind(server, settings.tls_listen, credentials)
    components.start()
    server.start()
    watch = _DatabaseWatch(health_servicer, services, runtime.stop_event)
    watch.check()
    watch.start()
    if settings.metrics_listen:
        metrics.serve(settings.metrics_listen)
    log.info("oma-server listening on port %d (%d services)", port, len(services))
    if identity is not None:
        log.info("oma-server listening with TLS on port %d, certificate %s SHA-256 %s (%s; VMAs pin this)",
                 tls_port, identity.cert_path, identity.fingerprint,
                 "generated, self-signed" if identity.generated else "configured")
    return RunningServer(server, port, runtime, components, services, tls_port, identity)
