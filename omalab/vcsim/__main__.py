"""``python -m omalab.vcsim [flags]``: build the simulator if needed and run it (``-h`` lists the flags)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from omalab.vcsim import VCSimError, build_vcsim


def main(argv: Sequence[str] | None = None) -> int:
    """Build and exec the simulator with the given flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        binary = build_vcsim()
    except VCSimError as exc:
        print(exc, file=sys.stderr)
        return 2
    os.execv(str(binary), [str(binary), *argv])
    return 0  # unreachable


if __name__ == "__main__":
    raise SystemExit(main())
