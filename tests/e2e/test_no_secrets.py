"""No secret is ever returned or logged: a whole migration (discovery with explicit and saved
credentials, CloudStack configuration, full and incremental replication, failures) logged at DEBUG
from every logger, and every response, must not contain the vCenter password, the CloudStack secret
key or API key, or a bearer token."""
from __future__ import annotations

import logging
import os

import grpc
from google.protobuf import json_format
from oma.v1 import cloudstack_settings_pb2, discovery_pb2, ossea_config_pb2, replications_pb2, vmware_credentials_pb2

from oma_server.db import models
from oma_server.domain import nbd_access


def test_secrets_never_reach_logs_or_responses(lab_private, caplog):
    lab = lab_private
    caplog.set_level(logging.DEBUG)
    secrets = {lab.vcenter.password, lab.cloudstack.secret_key, lab.cloudstack.api_key, lab.client.token}
    responses = []

    responses.append(lab.client.discovery.PreviewDiscovery(discovery_pb2.PreviewDiscoveryRequest(
        source=discovery_pb2.VCenterSource(vcenter=lab.vcenter.address, username=lab.vcenter.username,
                                           password=lab.vcenter.password, datacenter=lab.vcenter.datacenters[0],
                                           thumbprint=lab.vcenter.thumbprint_sha1)), timeout=60))
    wrong = "Wrong-Password-123"
    secrets.add(wrong)
    try:
        lab.client.discovery.PreviewDiscovery(discovery_pb2.PreviewDiscoveryRequest(
            source=discovery_pb2.VCenterSource(vcenter=lab.vcenter.address, username=lab.vcenter.username,
                                               password=wrong, datacenter="DC0", insecure=True)), timeout=60)
    except grpc.RpcError as exc:
        responses.append(exc.details())
    responses.append(lab.client.cloudstack.TestConnection(cloudstack_settings_pb2.TestConnectionRequest(
        api_url=lab.cloudstack.url, api_key=lab.cloudstack.api_key, secret_key="not-the-secret-key"), timeout=30))
    secrets.add("not-the-secret-key")
    responses.append(lab.client.ossea.ListConfigs(ossea_config_pb2.ListConfigsRequest(include_inactive=True), timeout=10))
    responses.append(lab.client.credentials.ListCredentials(vmware_credentials_pb2.ListCredentialsRequest(), timeout=10))
    responses.append(lab.client.credentials.TestCredential(
        vmware_credentials_pb2.TestCredentialRequest(id=lab.credential_id), timeout=60))

    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[lab.vcenter.data_vms[0]]),
        timeout=60)
    context_id = added.processed_vms[0].context_id
    for _ in range(2):
        job = lab.client.replications.CreateReplication(
            replications_pb2.CreateReplicationRequest(context_id=context_id), timeout=30)
        responses.extend(lab.client.watch_replication(job.job_id, timeout=120))
        lab.vcenter.guest_write(lab.vcenter.data_vms[0], "disk-2000", 0, os.urandom(4096))
    responses.append(lab.client.replications.GetReplication(
        replications_pb2.GetReplicationRequest(job_id=job.job_id), timeout=10))

    # The TLS pre-shared keys of the jobs' NBD exports, as hex (their form in key files) and raw.
    for row in models.ReplicationJob.select():
        psk = nbd_access.export_psk(lab.oma.runtime.secrets, row.id)
        secrets |= {psk.hex(), psk.decode("latin-1")}
    lab.oma.components.log_events.flush()
    texts = [r if isinstance(r, str) else json_format.MessageToJson(r) for r in responses]
    texts += [record.getMessage() + " " + repr(record.args) + " " + str(record.exc_text or "")
              for record in caplog.records]
    texts += [e.message + " " + str(e.attrs) for e in models.LogEvent.select()]
    texts += [str(s.metadata) + " " + str(s.error_message) for s in models.JobStep.select()]
    texts += [str(j.metadata) + " " + str(j.error_message) for j in models.JobTracking.select()]
    assert len(caplog.records) > 50  # the logs really were captured
    leaks = {secret for secret in secrets for text in texts if secret and secret in text}
    where = [text[:200] for secret in leaks for text in texts if secret in text][:3]
    assert not leaks, f"secrets found in logs or responses: {len(leaks)}: {where}"


def test_explicit_discovery_details_keep_the_password_out_of_their_repr():
    """A traceback or a debug line that shows the request's connection details must not show the password."""
    from oma_server.domain.discovery import VCenterSource

    shown = repr(VCenterSource(vcenter="vc.example:443", username="administrator", password="hunter2-secret"))
    assert "vc.example:443" in shown and "hunter2-secret" not in shown
