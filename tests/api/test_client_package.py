"""The Python client is a package of its own (clients/python): generated stubs with .pyi stubs, the
typed client and the omactl console script, depending only on grpcio/protobuf — not on the servers."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_client_wheel_is_self_contained(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT / "clients/python")], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("oma_vma_client-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("oma/v1/replications_pb2.py", "oma/v1/replications_pb2.pyi", "oma/v1/replications_pb2_grpc.py",
                     "vma/v1/progress_pb2.py", "migration/v1/options_pb2.py", "omaclient/client.py",
                     "omaclient/cli/__init__.py", "omaclient/cli/common.py", "omaclient/py.typed"):
        assert expected in names, expected
    assert not any(n.startswith(("oma_server/", "vma_agent/", "tests/")) for n in names)
    meta = zipfile.ZipFile(wheel)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = meta.read(f"{dist_info}/METADATA").decode()
    requires = sorted(line.split(":", 1)[1].strip().split(" ")[0].split("=")[0].split("<")[0].split(">")[0]
                      for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["grpcio", "grpcio-status", "protobuf"]
    assert "omactl = omaclient.cli:main" in meta.read(f"{dist_info}/entry_points.txt").decode()
