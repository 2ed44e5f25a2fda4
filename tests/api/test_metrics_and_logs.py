"""Prometheus metrics of both servers (RPC counts by method and code, jobs by status, bytes copied,
copy rate) and structured logs carrying job and context ids."""
from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
from oma.v1 import discovery_pb2, vm_contexts_pb2
from oma.v1 import replications_pb2 as pb

from oma_server import logs
from omalab.lab import start_lab
from vma_agent.integrations.nbdkit import free_tcp_port


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_of_both_servers(db, tmp_path):
    oma_port, vma_port = free_tcp_port(), free_tcp_port()
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1,
                   oma_settings={"metrics_listen": f"127.0.0.1:{oma_port}"},
                   vma_settings={"metrics_listen": f"127.0.0.1:{vma_port}"}) as lab:
        with pytest.raises(grpc.RpcError):
            lab.client.contexts.GetVMContext(vm_contexts_pb2.GetVMContextRequest(context_id="nope"), timeout=10)
        context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
            source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[lab.vcenter.data_vms[0]]),
            timeout=60).processed_vms[0].context_id
        job_id = lab.client.replications.CreateReplication(
            pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
        assert list(lab.client.watch_replication(job_id, timeout=120))[-1].status == "completed"

        oma = _scrape(oma_port)
        assert oma['oma_rpc_handled_total{code="NOT_FOUND",method="/oma.v1.VMContextService/GetVMContext"}'] >= 1
        assert oma['oma_rpc_handled_total{code="OK",method="/oma.v1.AuthService/Login"}'] >= 1
        assert oma['oma_replication_jobs{status="completed"}'] == 1
        assert oma['oma_replication_jobs{status="replicating"}'] == 0
        assert oma['oma_replication_jobs_ended_total{status="completed"}'] >= 1
        assert oma["oma_replication_bytes_total"] > 0
        assert any(k.startswith("oma_rpc_handling_seconds_bucket") for k in oma)

        vma = _scrape(vma_port)
        assert vma['vma_rpc_handled_total{code="OK",method="/vma.v1.ReplicationService/StartReplication"}'] >= 1
        assert vma['vma_replication_jobs_total{status="succeeded"}'] >= 1
        assert vma["vma_bytes_copied_total"] > 0


def test_json_logs_carry_job_and_context_ids():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.configure_logging("INFO", "json")
    root = logging.getLogger()
    handler.addFilter(root.handlers[0].filters[0])
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        with logs.bind(job_id="job-1", context_id="ctx-1"):
            logging.getLogger("oma_server.test").info("copying")
        logging.getLogger("oma_server.test").info("idle")
    finally:
        root.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["message"], first["job_id"], first["context_id"], first["level"]) == \
        ("copying", "job-1", "ctx-1", "INFO")
    assert "job_id" not in second
