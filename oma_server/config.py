"""The one home of the OMA server's configuration.

Every setting has a default that works out of the box on SQLite (a file under the user's data dir),
can be set from the environment as ``OMA_<NAME>`` (e.g. ``OMA_LISTEN``, ``OMA_DB_URL``) and, for the
few that people change on the command line, by a flag of ``oma-server`` (flags win over environment).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from server_kit.settings import ConfigError, ServingSettings, load

__all__ = ["ENV_PREFIX", "ConfigError", "Settings", "load_settings"]

ENV_PREFIX = "OMA_"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("oma-server"))


@dataclass(frozen=True)
class Settings(ServingSettings):
    # --- serving (and the kit's: max_workers, max_concurrent_rpcs, metrics_listen, log_*) -----
    # Plaintext gRPC (local tools, the lab). Production refuses a non-loopback address here unless
    # allow_plaintext_listen is set (e.g. behind a TLS-terminating proxy): remote clients use tls_listen.
    listen: str = "127.0.0.1:9090"
    allow_plaintext_listen: bool = False
    # TLS gRPC ("host:port", same services; the VMAs' enrollment goes here); empty = off. Without
    # tls_cert_file/tls_key_file (PEM, both or neither) a self-signed certificate is generated once into
    # <data_dir>/oma-tls.crt + oma-tls.key (0600) and reused; its SHA-256 is logged at start for pinning.
    tls_listen: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    # --- state -----------------------------------------------------------------------------
    data_dir: Path = field(default_factory=_default_data_dir)
    # sqlite:///path/file.db (default: <data_dir>/oma.db) or mysql://user:pass@host:port/db
    db_url: str = ""
    # MariaDB connections kept open: one per RPC worker thread (max_workers), so no call waits for a connection.
    db_pool_size: int = 32

    # --- security --------------------------------------------------------------------------
    # Production refuses to start without explicitly configured keys (no generated key files).
    production: bool = False
    # Password of the "admin" user created on the FIRST start only (when api_users is empty); generated and
    # printed once if unset. Ignored once any user exists: change it with `omactl passwd` (ChangePassword).
    admin_password: str = ""
    # HMAC secret for bearer tokens (production: at least 32 bytes); unset → a random secret kept in
    # <data_dir>/token.secret. token_secret_previous: the secret being rotated out, still accepted (never used to
    # sign) so live tokens survive a rotation until they expire (docs/security/auth.md).
    token_secret: str = ""
    token_secret_previous: str = ""
    token_ttl_seconds: int = 8 * 3600
    # How stale this process's view of users and revoked tokens may be (a revocation made by another OMA
    # process on the same database takes effect here within this time; through this process, at once).
    token_revocation_cache_seconds: float = 5.0
    # Login throttling (per process, in memory; docs/security/auth.md): failed password checks allowed per user
    # name and per client address before each further attempt waits backoff_base * 2^n seconds (at most
    # backoff_max); counters are forgotten login_failure_window_seconds after the last attempt.
    login_free_failures_per_user: int = 5
    login_free_failures_per_peer: int = 20
    login_backoff_base_seconds: float = 1.0
    login_backoff_max_seconds: float = 900.0
    login_failure_window_seconds: float = 900.0
    # New passwords (CreateUser, ChangePassword) must be at least this long.
    password_min_length: int = 12
    # Base64 of 32 bytes (AES-256-GCM) for secrets at rest; unset → <data_dir>/encryption.key
    # (development only). MIGRATEKIT_CRED_ENCRYPTION_KEY is accepted as the original's name.
    encryption_key: str = ""

    # --- VMA agent -------------------------------------------------------------------------
    vma_address: str = "127.0.0.1:9091"
    vma_token: str = ""
    vma_timeout_seconds: float = 60.0
    vma_retries: int = 3

    # --- CloudStack and the replica volumes ------------------------------------------------
    cloudstack_poll_interval_seconds: float = 2.0
    cloudstack_job_timeout_seconds: float = 300.0
    # Replica volume size = source capacity + this many GiB (room for the conversion tooling).
    replica_extra_gib: int = 5
    # Where attached volumes appear on this (KVM) host: <device_dir>/virtio-<first 20 hex of uuid>.
    device_dir: Path = Path("/dev/disk/by-id")
    device_wait_seconds: float = 120.0

    # --- NBD exports of the attached volumes -----------------------------------------------
    # Address the VMA uses to reach the exports, and the address/ports nbdkit binds.
    nbd_public_host: str = "127.0.0.1"
    nbd_bind_host: str = "127.0.0.1"
    nbd_port_min: int = 10809
    nbd_port_max: int = 10999
    # TLS with a per-job pre-shared key on every export (docs/security/data.md). Off only where nothing but
    # the VMA's tunnel can reach the export ports and the encryption cost matters (each VMA's permitopen
    # still limits it to its own jobs' exports).
    nbd_tls: bool = True

    # --- replication bookkeeping -----------------------------------------------------------
    # No VMA progress for this long → the job fails as stale.
    progress_stale_after_seconds: float = 300.0
    # While a copy runs, how often the OMA checks that the job's nbdkit exports are alive (a dead one is
    # served again on the same port).
    export_watch_seconds: float = 2.0
    # A job the VMA does not know after this grace period is lost.
    progress_not_found_grace_seconds: float = 120.0
    # A job the VMA lost (agent crash or restart, a stream that ended early, a copy that failed with its
    # snapshot kept) is resumed from its checkpoints at most this many times, then fails. While the VMA
    # is unreachable the job waits (up to progress_stale_after_seconds) instead of failing.
    replication_max_resumes: int = 5
    # Replication workflow workers (setup + following the VMA stream).
    replication_workers: int = 8
    # Name of this OMA process in job leases (default: the host name). Several processes on one
    # database need distinct names; a process that restarts under its name resumes its jobs at once.
    instance_name: str = ""
    # A job whose worker has not renewed its lease for this long is taken over by another process.
    worker_lease_seconds: float = 60.0

    # --- scheduler -------------------------------------------------------------------------
    # Schedule executions running at once across all schedules; firings above it are recorded as skipped.
    scheduler_max_concurrent_executions: int = 10
    # The scheduler re-reads the schedules at least this often (writes by other OMA processes).
    scheduler_reload_seconds: float = 30.0

    # --- VMA enrollment and the SSH tunnel -------------------------------------------------
    # authorized_keys of the tunnel account (e.g. /home/vma_tunnel/.ssh/authorized_keys); only the
    # enrollment approvals write it. Empty = <data_dir>/tunnel/authorized_keys (lab).
    tunnel_authorized_keys: str = ""
    # sshd's Ed25519 public host key (e.g. /etc/ssh/ssh_host_ed25519_key.pub), whose fingerprint
    # approved VMAs pin. Empty = a key generated in <data_dir> (lab).
    tunnel_host_key: str = ""
    tunnel_ssh_user: str = "vma_tunnel"
    tunnel_ssh_port: int = 443
    # Forced command of every VMA key (logs the session; the tunnel itself runs `ssh -N`).
    tunnel_forced_command: str = "/usr/local/sbin/vma-tunnel-wrapper"
    # OMA-side ports handed out, one per approved VMA, for the reverse forward to its API.
    tunnel_reverse_port_min: int = 9081
    tunnel_reverse_port_max: int = 9180
    # Enroll → VerifyChallenge deadline, and the (longer) window for the operator's approval.
    enrollment_verify_window_seconds: int = 600
    enrollment_approval_window_seconds: int = 24 * 3600
    enrollment_sweep_interval_seconds: float = 30.0
    # Calls of the public enrollment RPCs per source address and minute.
    enrollment_rate_limit_per_minute: int = 60
    # The connection monitor calls each approved VMA's health service through its reverse-forward port on
    # this host every interval; a VMA not answering for disconnect_after is marked disconnected.
    tunnel_reverse_host: str = "127.0.0.1"
    vma_monitor_interval_seconds: float = 60.0
    vma_monitor_probe_timeout_seconds: float = 5.0
    vma_disconnect_after_seconds: float = 300.0

    # --- failover, rollback and cleanup ----------------------------------------------------
    # Workflow workers (failovers, test cleanups, rollbacks, failed-execution cleanups).
    failover_workers: int = 4
    # CloudStack async jobs of a failover: VM deploy/start/stop/destroy, volume attach/detach, snapshots.
    failover_vm_timeout_seconds: float = 300.0
    failover_volume_timeout_seconds: float = 300.0
    failover_snapshot_timeout_seconds: float = 300.0
    # How long a destination VM may take to reach Stopped after stopVirtualMachine.
    failover_vm_stop_wait_seconds: float = 300.0
    # Source VM power budgets sent to the VMA (graceful shutdown, then power-off) and for power-on.
    failover_power_off_seconds: int = 300
    failover_power_on_seconds: int = 180
    # Longest wait for the live failover's final sync (an in-process replication) to end.
    failover_final_sync_timeout_seconds: float = 1800.0
    # VirtIO driver injection for Windows guests: a command run as `<command> <device path> <job id>`
    # against the OS volume's device on this host (e.g. a virt-v2v-in-place wrapper). Empty = not
    # available: the step is recorded as skipped, never as a success.
    virtio_injection_command: str = ""
    virtio_injection_timeout_seconds: float = 1800.0
    # Background sweep: automatic end of expired test failovers (auto_cleanup) and failover jobs whose
    # process died (no heartbeat for worker_lease_seconds). 0 = off.
    failover_sweep_seconds: float = 60.0

    @property
    def effective_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'oma.db'}"


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``OMA_*`` environment variables, then explicit overrides (CLI flags). A variable that
    does not convert (``OMA_PRODUCTION=ture``) raises :class:`ConfigError` naming it (the server kit's rules:
    :mod:`server_kit.settings`). ``MIGRATEKIT_CRED_ENCRYPTION_KEY`` is read when ``OMA_ENCRYPTION_KEY`` is not set."""
    return load(Settings, ENV_PREFIX, overrides, environ,
                aliases={"encryption_key": "MIGRATEKIT_CRED_ENCRYPTION_KEY"})
