"""The one home of the VMA agent's configuration.

Defaults work for the local lab; every setting can come from the environment as ``VMA_<NAME>`` and
the common ones from ``vma-agent`` flags (flags win).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from server_kit.settings import ConfigError, ServingSettings, is_loopback, load

__all__ = ["ENV_PREFIX", "MIN_TOKEN_LENGTH", "ConfigError", "Settings", "load_settings"]

ENV_PREFIX = "VMA_"
#: The shortest bearer token accepted on a non-loopback address.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Settings(ServingSettings):
    # (and the kit's: max_workers, max_concurrent_rpcs, metrics_listen, log_level, log_format)
    listen: str = "127.0.0.1:9091"
    # Bearer token the OMA must present. Empty = no authentication, which the agent accepts only on a
    # loopback address (the lab, or behind the enrollment tunnel, whose reverse forward ends on
    # 127.0.0.1); any other listen address needs a token of at least MIN_TOKEN_LENGTH characters.
    auth_token: str = ""
    # Ended jobs' progress is kept this long for late readers.
    progress_retention_seconds: float = 6 * 3600
    # At most this many jobs' progress is held in memory; a new job beyond it evicts the longest-ended
    # job, or is refused (RESOURCE_EXHAUSTED) while all of them still run.
    progress_max_jobs: int = 1000
    # HTTP/2 keep-alive, so a progress stream lasting hours survives quiet periods and idle NATs:
    # the agent pings its clients this often, and accepts their pings down to this interval (gRPC's
    # own default refuses pings more often than every 5 minutes and closes the stream).
    grpc_keepalive_seconds: float = 30.0
    grpc_min_client_ping_seconds: float = 10.0

    # --- vCenter ---------------------------------------------------------------------------
    vcenter_timeout_seconds: float = 60.0
    power_off_timeout_seconds: int = 300
    power_on_timeout_seconds: int = 600

    # --- data mover ------------------------------------------------------------------------
    # How the source disks are read: "vddk" (nbdkit vddk plugin, production) or "file" (nbdkit
    # file plugin over datastore folders mapped by datastore_map, e.g. the simulated vCenter).
    source_mode: str = "vddk"
    # "LocalDS_0=/var/lib/vcsim/ds0,OtherDS=/mnt/ds1" for source_mode=file.
    datastore_map: str = ""
    vddk_libdir: str = "/opt/vmware-vix-disklib-distrib"
    work_dir: Path = Path("/tmp/vma-agent")
    # Disks copied in parallel per job, and NBD connection pairs per disk (0 = the copier's default:
    # one per two CPUs, at most 4 — more only adds threads competing with nbdkit on small VMAs).
    parallel_disks: int = 2
    connections_per_disk: int = 0
    # Incremental extents closer than this are merged into one read (the gap is copied too). 0 copies
    # exactly what CBT reports; the copier keeps many small requests in flight, so merging rarely pays.
    extent_merge_gap_bytes: int = 0
    progress_interval_seconds: float = 1.0
    # Throttle reading each source disk to this many megabits per second (0 = unlimited), to protect
    # production storage during business hours (nbdkit's rate filter on the source export).
    source_rate_limit_mbps: float = 0.0
    # Tries per NBD command (reconnecting in between, back-off 0.5 s doubling to 10 s): patient enough
    # for the OMA to restart and serve its exports again (~35 s in all).
    copy_retry_tries: int = 8
    # Checkpoints: every this many MiB or seconds (whichever comes first) the copier flushes the
    # target and reports the offset below which each disk is durable (DiskProgress.checkpoint_offset).
    # Smaller: less rewritten after a crash; larger: fewer flushes.
    checkpoint_interval_mib: int = 64
    checkpoint_interval_seconds: float = 5.0
    # No fixed time limit on a copy: it fails only after no byte was written for this long; until
    # then lost connections are retried from the last checkpoint with back-off.
    copy_stall_seconds: float = 600.0
    # Journal of running jobs (snapshot, checkpoints; no secrets) read back after a crash or
    # restart (ListInterruptedJobs). Empty: <work_dir>/jobs; give a persistent path in production.
    job_journal_dir: str = ""
    # Interrupted jobs older than this are reported expired: remove their snapshot, do not resume.
    leftover_snapshot_max_age_seconds: float = 24 * 3600
    # Touch the vCenter session of a running job this often, so a long copy never outlives it.
    vcenter_keepalive_seconds: float = 120.0

    # --- enrollment with an OMA ------------------------------------------------------------
    # Private directory (0700) of the enrollment key (OpenSSH format, 0600), the saved state (the
    # flow resumes from it after a restart) and the tunnel's ssh configuration.
    enrollment_dir: Path = Path("/var/lib/vma-agent/enrollment")
    # How often GetEnrollmentResult is asked while waiting for the operator's approval.
    enrollment_poll_interval_seconds: float = 5.0
    # Deadline of each call to the OMA.
    enrollment_call_timeout_seconds: float = 30.0
    # Once approved, keep the SSH tunnel to the OMA up (pin the host key, run ssh, restart it after it
    # ends); off: the agent only writes tunnel.ssh_config and tunnel.command for the operator to run.
    tunnel_enabled: bool = True
    tunnel_restart_delay_seconds: float = 10.0
    tunnel_check_interval_seconds: float = 5.0

    def check(self) -> None:
        """Refuse settings the agent must not start with (raises :class:`ConfigError` naming the setting)."""
        self.check_serving()
        if not is_loopback(self.listen):
            if not self.auth_token:
                raise ConfigError(
                    f"listen = {self.listen!r} is not a loopback address and auth_token (VMA_AUTH_TOKEN) is "
                    f"empty: anyone who reaches that address could drive vCenter through this agent. Set "
                    f"VMA_AUTH_TOKEN to the OMA's vma_token, or listen on 127.0.0.1 (behind the tunnel)")
            if len(self.auth_token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"auth_token (VMA_AUTH_TOKEN) must be at least {MIN_TOKEN_LENGTH} characters "
                                  f"when listen ({self.listen!r}) is not a loopback address")
        if self.progress_max_jobs < 1:
            raise ConfigError("progress_max_jobs (VMA_PROGRESS_MAX_JOBS) must be at least 1")

    def journal_dir(self) -> Path:
        return Path(self.job_journal_dir) if self.job_journal_dir else Path(self.work_dir) / "jobs"

    def datastores(self) -> dict[str, Path]:
        mapping = {}
        for item in filter(None, (s.strip() for s in self.datastore_map.split(","))):
            name, _, folder = item.partition("=")
            mapping[name.strip()] = Path(folder.strip())
        return mapping


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``VMA_*`` environment variables, then explicit overrides (CLI flags). A variable that
    does not convert (``VMA_TUNNEL_ENABLED=ture``) raises :class:`ConfigError` naming it (the server kit's
    rules: :mod:`server_kit.settings`)."""
    return load(Settings, ENV_PREFIX, overrides, environ)
