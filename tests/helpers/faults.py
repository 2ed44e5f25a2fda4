"""Faults the lab can inject into the simulated vCenter."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def datastore_gone(lab):
    """The VM's datastore folder disappears: vCenter cannot create the snapshot the copy reads from."""
    folder = next(iter(lab.vcenter.datastores.values()))
    moved = folder.with_name(folder.name + "-away")
    os.rename(folder, moved)
    yield
    os.rename(moved, folder)
