"""``oma-server``: run the OMA gRPC server (default), apply database migrations, print the sshd
settings of the VMA tunnel account (``tunnel-sshd-config``, a drop-in for /etc/ssh/sshd_config.d/), or
re-encrypt every stored secret with a new key (``rotate-encryption-key --new-key-file FILE``)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from oma_server.config import ConfigError, load_settings
from oma_server.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-server", description=__doc__)
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", "tunnel-sshd-config",
                                                                  "rotate-encryption-key"])
    p.add_argument("--listen", help="address to serve gRPC on (default 127.0.0.1:9090, env OMA_LISTEN)")
    p.add_argument("--tls-listen", help="also serve gRPC over TLS on host:port (env OMA_TLS_LISTEN; default off)")
    p.add_argument("--tls-cert", dest="tls_cert_file",
                   help="PEM certificate (chain) for --tls-listen (env OMA_TLS_CERT_FILE; default: generated)")
    p.add_argument("--tls-key", dest="tls_key_file",
                   help="PEM private key of --tls-cert (env OMA_TLS_KEY_FILE; default: generated)")
    p.add_argument("--db", dest="db_url", help="sqlite:///file.db or mysql://user:pass@host:port/db (env OMA_DB_URL)")
    p.add_argument("--data-dir", help="folder for the SQLite file and generated keys (env OMA_DATA_DIR)")
    p.add_argument("--vma", dest="vma_address", help="VMA agent address host:port (env OMA_VMA_ADDRESS)")
    p.add_argument("--new-key-file",
                   help="rotate-encryption-key: file holding the new key (base64 of 32 bytes, e.g. from "
                        "`openssl rand -base64 32`; keep it 0600)")
    p.add_argument("--metrics-listen", help="serve Prometheus metrics on host:port (env OMA_METRICS_LISTEN)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings({
            "listen": args.listen, "tls_listen": args.tls_listen, "tls_cert_file": args.tls_cert_file,
            "tls_key_file": args.tls_key_file, "db_url": args.db_url, "data_dir": args.data_dir,
            "vma_address": args.vma_address, "metrics_listen": args.metrics_listen,
        })
        settings.check_serving()
    except ConfigError as exc:
        print(f"oma-server: not started: {exc}", file=sys.stderr, flush=True)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "migrate":
        from oma_server.db.database import secure_data_dir
        from oma_server.server import prepare_database

        secure_data_dir(settings.data_dir)
        generated = prepare_database(settings)
        if generated:
            print(f"oma-server: created user 'admin' with password: {generated}  (shown once)")
        print("oma-server: database is up to date")
        return 0

    if args.command == "rotate-encryption-key":
        return _rotate_encryption_key(settings, args.new_key_file)

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


def _rotate_encryption_key(settings, new_key_file: str | None) -> int:
    """Re-encrypt every secret with the key in ``new_key_file`` (one transaction). With a configured
    OMA_ENCRYPTION_KEY the operator then configures the new key; with the development key file in the
    data dir, that file is replaced (after the commit: until then the old key file still matches)."""
    from pathlib import Path

    from oma_server.db.database import secure_data_dir
    from oma_server.domain import secrets_at_rest
    from oma_server.domain.crypto import SecretBox, decode_key, write_key_file
    from oma_server.errors import DomainError
    from oma_server.server import load_secret_box, prepare_database

    if not new_key_file:
        print("oma-server: rotate-encryption-key needs --new-key-file FILE (base64 of 32 bytes)", file=sys.stderr)
        return 2
    try:
        new_key = decode_key(Path(new_key_file).read_text())
    except (OSError, ValueError) as exc:
        print(f"oma-server: cannot use {new_key_file} as the new key: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    secure_data_dir(settings.data_dir)
    old = load_secret_box(settings)
    prepare_database(settings, secrets=old)
    from oma_server.db.database import db

    try:
        with db.connection_context():
            rotation = secrets_at_rest.rotate(old, SecretBox(new_key))
    except DomainError as exc:
        print(f"oma-server: nothing was changed: {exc.message}", file=sys.stderr)
        return 1
    done = ", ".join(f"{name}: {n}" for name, n in rotation.reencrypted.items())
    print(f"oma-server: every secret re-encrypted with the new key ({done}); "
          f"{rotation.pairing_codes_expired} unused pairing code(s) expired")
    if settings.encryption_key:
        print("oma-server: now set OMA_ENCRYPTION_KEY to the new key (the content of "
              f"{new_key_file}) for every OMA process on this database, then start them")
    else:
        write_key_file(settings.data_dir / "encryption.key", new_key)
        print(f"oma-server: {settings.data_dir / 'encryption.key'} now holds the new key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
