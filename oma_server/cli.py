"""``oma-server``: run the OMA gRPC server (default), apply database migrations, or print the sshd
settings of the VMA tunnel account (``tunnel-sshd-config``, a drop-in for /etc/ssh/sshd_config.d/)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from oma_server.config import load_settings
from oma_server.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-server", description=__doc__)
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", "tunnel-sshd-config"])
    p.add_argument("--listen", help="address to serve gRPC on (default 127.0.0.1:9090, env OMA_LISTEN)")
    p.add_argument("--tls-listen", help="also serve gRPC over TLS on host:port (env OMA_TLS_LISTEN; default off)")
    p.add_argument("--tls-cert", dest="tls_cert_file",
                   help="PEM certificate (chain) for --tls-listen (env OMA_TLS_CERT_FILE; default: generated)")
    p.add_argument("--tls-key", dest="tls_key_file",
                   help="PEM private key of --tls-cert (env OMA_TLS_KEY_FILE; default: generated)")
    p.add_argument("--db", dest="db_url", help="sqlite:///file.db or mysql://user:pass@host:port/db (env OMA_DB_URL)")
    p.add_argument("--data-dir", help="folder for the SQLite file and generated keys (env OMA_DATA_DIR)")
    p.add_argument("--vma", dest="vma_address", help="VMA agent address host:port (env OMA_VMA_ADDRESS)")
    p.add_argument("--metrics-listen", help="serve Prometheus metrics on host:port (env OMA_METRICS_LISTEN)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings({
        "listen": args.listen, "tls_listen": args.tls_listen, "tls_cert_file": args.tls_cert_file,
        "tls_key_file": args.tls_key_file, "db_url": args.db_url, "data_dir": args.data_dir,
        "vma_address": args.vma_address, "metrics_listen": args.metrics_listen,
    })
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "migrate":
        from oma_server.server import prepare_database

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        generated = prepare_database(settings)
        if generated:
            print(f"oma-server: created user 'admin' with password: {generated}  (shown once)")
        print("oma-server: database is up to date")
        return 0

    if args.command == "tunnel-sshd-config":
        from oma_server.domain.enrollment import tunnel_for
        from oma_server.errors import DomainError

        try:
            tunnel = tunnel_for(settings)
        except DomainError as exc:
            print(f"oma-server: {exc}", file=sys.stderr)
            return 1
        print(tunnel.keys.sshd_config(tunnel.ssh_user, tunnel.ssh_port, tunnel.reverse_ports), end="")
        return 0

    from oma_server.server import build_server

    running = build_server(settings)
    print(f"oma-server: serving on port {running.port}", flush=True)
    if running.tls_identity is not None:
        print(f"oma-server: serving TLS on port {running.tls_port}, certificate SHA-256 "
              f"{running.tls_identity.fingerprint}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    logging.getLogger("oma_server").info("shutting down")
    running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
