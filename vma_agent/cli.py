"""``vma-agent``: run the VMware-side agent (discovery, power, CBT, replication, progress)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from server_kit.logs import configure_logging
from vma_agent.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vma-agent", description=__doc__)
    p.add_argument("--listen", help="address to serve gRPC on (default 127.0.0.1:9091, env VMA_LISTEN)")
    p.add_argument("--source-mode", choices=["vddk", "file"], help="how source disks are read (env VMA_SOURCE_MODE)")
    p.add_argument("--datastore-map", help="NAME=/folder,... for --source-mode file (env VMA_DATASTORE_MAP)")
    p.add_argument("--metrics-listen", help="serve Prometheus metrics on host:port (env VMA_METRICS_LISTEN)")
    args = p.parse_args(argv)
    from vma_agent.server import build_server

    try:
        settings = load_settings({
            "listen": args.listen, "source_mode": args.source_mode, "datastore_map": args.datastore_map,
            "metrics_listen": args.metrics_listen,
        })
        settings.check()  # before logging is set up with its level and format
        configure_logging(settings.log_level, settings.log_format)
        running = build_server(settings)
    except ConfigError as exc:
        print(f"vma-agent: not started: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"vma-agent: serving on port {running.port}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
