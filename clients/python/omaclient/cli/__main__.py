"""``python -m omaclient.cli``: the same as ``omactl``."""
import sys

from omaclient.cli import main

sys.exit(main())
