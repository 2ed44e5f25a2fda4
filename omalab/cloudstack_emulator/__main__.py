"""``python -m omalab.cloudstack_emulator --port 0 --state-dir DIR``: run the emulator for the lab.

Prints one JSON line (url, api/secret keys, state and by-id dirs, seeded ids) on stdout once the
server listens, then serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from . import CloudStackEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omalab.cloudstack_emulator",
                                     description="CloudStack API emulator for the lab demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--state-dir", required=True, help="volumes, snapshots and by-id links")
    parser.add_argument("--byid-dir", help="default: <state-dir>/dev/disk/by-id")
    parser.add_argument("--oma-mac", default="auto",
                        help="MAC of the OMA appliance VM's NIC (auto: a local interface's)")
    parser.add_argument("--job-delay", type=float, default=0.2, help="seconds a job stays pending")
    parser.add_argument("--api-key")
    parser.add_argument("--secret-key")
    parser.add_argument("--unknown-command-status", type=int, choices=(401, 432), default=432)
    args = parser.parse_args(argv)

    emu = CloudStackEmulator(
        args.state_dir, host=args.host, port=args.port, byid_dir=args.byid_dir,
        oma_mac=args.oma_mac, job_delay=args.job_delay, api_key=args.api_key,
        secret_key=args.secret_key, unknown_command_status=args.unknown_command_status,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    emu.start()
    try:
        print(json.dumps(emu.info()), flush=True)
        stop.wait()
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
