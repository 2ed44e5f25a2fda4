from __future__ import annotations

from oma.v1 import discovery_pb2 as pb
from oma.v1 import discovery_pb2_grpc

from oma_server.convert import fill, optional, timestamp
from oma_server.db.models import utcnow
from oma_server.domain import discovery, groups
from oma_server.errors import require
from oma_server.integrations.vma_client import VmaClient
from oma_server.rpc import caller_name


def _source(message) -> discovery.VCenterSource:
    return discovery.VCenterSource(
        credential_id=optional(message, "credential_id"),
        vcenter=message.vcenter, username=message.username, password=message.password,
        datacenter=message.datacenter, thumbprint=message.thumbprint, insecure=message.insecure,
    )


def _processed(p: discovery.ProcessedVM) -> pb.ProcessedVM:
    return pb.ProcessedVM(vm_name=p.vm_name, outcome=p.outcome, context_id=p.context_id,
                          existing_context_id=p.existing_context_id, vm_path=p.vm_path, reason=p.reason)


def _add_response(result: discovery.AddResult) -> pb.AddVMsResponse:
    return pb.AddVMsResponse(
        success=result.success, message=result.message, vms_added=result.count("added"),
        vms_skipped=result.count("skipped"), vms_not_found=result.count("not_found"),
        vms_failed=result.count("failed"), total_vms=len(result.processed), added_at=timestamp(result.added_at),
        processed_vms=[_processed(p) for p in result.processed], tracking_job_id=result.tracking_job_id,
    )


def _discovered(inventory: discovery.Inventory) -> list[pb.DiscoveredVM]:
    existing = discovery.existing_contexts(inventory.vcenter_host, inventory.vms)
    return [pb.DiscoveredVM(vm=vm, existing=vm.id in existing, context_id=existing.get(vm.id, ""))
            for vm in inventory.vms]


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):

    def __init__(self, runtime, vma: VmaClient):
        self._runtime = runtime
        self._box = runtime.secrets
        self._vma = vma

    def DiscoverVMs(self, request, context):
        require(not request.create_context or request.selected_vms,
                "create_context needs selected_vms (the VMs to add); nothing is added implicitly")
        login = discovery.resolve_login(self._box, _source(request.source))
        inventory = discovery.fetch_inventory(self._vma, login, filter=request.filter)
        addition = None
        if request.create_context:
            addition = discovery.add_vms(inventory, list(request.selected_vms), login=login,
                                         added_by=request.added_by or caller_name(), operation="discover-and-add-vms")
        response = pb.DiscoverVMsResponse(
            discovered_vms=_discovered(inventory), discovery_count=len(inventory.vms),
            processing_time_ms=inventory.elapsed_ms + (addition.processing_ms if addition else 0),
            status="partial_success" if addition and not addition.success else "success",
            message=addition.message if addition else f"{len(inventory.vms)} VMs discovered",
        )
        if addition:
            response.addition_result.CopyFrom(_add_response(addition))
        return response

    def AddVMs(self, request, context):
        require(request.vm_names, "vm_names must name at least one VM")
        login = discovery.resolve_login(self._box, _source(request.source))
        inventory = discovery.fetch_inventory(self._vma, login, names=list(request.vm_names))
        result = discovery.add_vms(inventory, list(request.vm_names), login=login,
                                   added_by=request.added_by or caller_name())
        return _add_response(result)

    def BulkAddVMs(self, request, context):
        require(request.selected_vms, "selected_vms must name at least one VM")
        source = discovery.VCenterSource(vcenter=request.vcenter, username=request.username,
                                         password=request.password, datacenter=request.datacenter,
                                         thumbprint=request.thumbprint, insecure=request.insecure)
        login = discovery.resolve_login(self._box, source)
        inventory = discovery.fetch_inventory(self._vma, login, filter=request.filter)
        result = discovery.add_vms(inventory, list(request.selected_vms), login=login, added_by=caller_name())
        by_outcome = {o: [_processed(p) for p in result.processed if p.outcome in o] for o in
                      (("added",), ("skipped",), ("failed", "not_found"))}
        return pb.BulkAddVMsResponse(
            total_requested=len(request.selected_vms), successfully_added=result.count("added"),
            skipped=result.count("skipped"), failed=result.count("failed") + result.count("not_found"),
            added_vms=by_outcome[("added",)], skipped_vms=by_outcome[("skipped",)],
            failed_vms=by_outcome[("failed", "not_found")], discovery_duration_ms=result.discovery_ms,
            processing_duration_ms=result.processing_ms, tracking_job_id=result.tracking_job_id,
        )

    def PreviewDiscovery(self, request, context):
        login = discovery.resolve_login(self._box, _source(request.source))
        inventory = discovery.fetch_inventory(self._vma, login, filter=request.filter, read_only=True)
        vms = _discovered(inventory)  # with disks and NICs: an operator chooses from them
        existing = sum(1 for v in vms if v.existing)
        return pb.PreviewDiscoveryResponse(
            vms=vms, total_discovered=len(vms), new_vms=len(vms) - existing, existing_vms=existing,
            processing_time_ms=inventory.elapsed_ms, vcenter=inventory.vcenter_host,
            datacenter=inventory.datacenter, filter=request.filter,
        )

    def ListUngroupedVMs(self, request, context):
        rows = groups.ungrouped_contexts()
        return pb.ListUngroupedVMsResponse(
            vms=[fill(pb.UngroupedVM(), c) for c in rows], count=len(rows), retrieved_at=timestamp(utcnow())
        )
