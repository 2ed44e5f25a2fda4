"""NetworkMappingService (mapping: POST /network-mappings inserts network_mappings, unique per
VM/context; GET reads; DELETE /network-mappings/{vm_id}/{source_network_name} deletes that row only)."""
from __future__ import annotations

import grpc
import pytest
from oma.v1 import network_mappings_pb2 as pb

from oma_server.db import models
from tests import factories


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _map(oma, **kw):
    values = dict(source_network_name="VM Network", destination_network_id="net-prod",
                  destination_network_name="Production")
    values.update(kw)
    return oma.network_mappings.CreateNetworkMapping(pb.CreateNetworkMappingRequest(**values), timeout=5)


def test_create_by_name_or_context_and_upsert(oma):
    ctx = factories.context(vm_name="web01")
    created = _map(oma, vm_id="web01")
    assert created.created and created.network_mapping.vm_context_id == ctx.context_id
    row = models.NetworkMapping.get_by_id(created.network_mapping.id)
    assert (row.vm_id, row.vmware_vm_id, row.mapping_type, row.validation_status) == \
        ("web01", ctx.vmware_vm_id, "live", "pending")
    test = _map(oma, vm_context_id=ctx.context_id, is_test_network=True, destination_network_id="net-test")
    assert test.network_mapping.mapping_type == "test"
    again = _map(oma, vm_id="web01", destination_network_id="net-prod-2", destination_network_name="Prod 2")
    assert not again.created and again.network_mapping.id == created.network_mapping.id
    assert models.NetworkMapping.select().count() == 2
    assert models.NetworkMapping.get_by_id(created.network_mapping.id).destination_network_id == "net-prod-2"


def test_create_rejects_bad_input(oma):
    factories.context(vm_name="web01")
    for kw, code in ((dict(vm_id="web01", source_network_name=""), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(vm_id="web01", destination_network_id=""), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(vm_id="web01", mapping_type="sideways"), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(vm_id="nobody"), grpc.StatusCode.NOT_FOUND),
                     (dict(), grpc.StatusCode.INVALID_ARGUMENT)):
        assert _error(lambda: _map(oma, **kw))[0] == code
    assert models.NetworkMapping.select().count() == 0


def test_list_all_returns_live_and_test_with_filters(oma):
    a, b = factories.context(vm_name="a"), factories.context(vm_name="b")
    _map(oma, vm_id="a")
    _map(oma, vm_id="a", is_test_network=True)
    _map(oma, vm_id="b", source_network_name="DMZ")
    listed = oma.network_mappings.ListNetworkMappings(pb.ListNetworkMappingsRequest(), timeout=5)
    assert listed.total_count == 3  # not only the test mappings (original defect)
    only_test = oma.network_mappings.ListNetworkMappings(pb.ListNetworkMappingsRequest(is_test_network=True), timeout=5)
    assert [m.vm_id for m in only_test.network_mappings] == ["a"]
    by_vm = oma.network_mappings.ListVMNetworkMappings(pb.ListVMNetworkMappingsRequest(vm_id="b"), timeout=5)
    assert [m.source_network_name for m in by_vm.network_mappings] == ["DMZ"]
    by_ctx = oma.network_mappings.ListVMNetworkMappings(
        pb.ListVMNetworkMappingsRequest(vm_context_id=a.context_id), timeout=5)
    assert by_ctx.total_count == 2
    assert b


def test_status_compares_with_discovered_networks(oma):
    ctx = factories.context(vm_name="app")
    factories.disk(ctx, network_config=[{"network_name": "VM Network"}, {"network_name": "Backup"}])
    status = oma.network_mappings.GetNetworkMappingStatus(pb.GetNetworkMappingStatusRequest(vm_id="app"), timeout=5)
    assert (status.has_mappings, status.readiness_level, list(status.source_networks)) == \
        (False, "none", ["Backup", "VM Network"])
    _map(oma, vm_id="app")
    status = oma.network_mappings.GetNetworkMappingStatus(pb.GetNetworkMappingStatusRequest(vm_id="app"), timeout=5)
    assert list(status.unmapped_live_networks) == ["Backup"] and not status.mapping_complete
    assert status.readiness_level == "partial"
    _map(oma, vm_id="app", source_network_name="Backup")
    _map(oma, vm_id="app", source_network_name="Backup", is_test_network=True)
    _map(oma, vm_id="app", is_test_network=True)
    status = oma.network_mappings.GetNetworkMappingStatus(pb.GetNetworkMappingStatusRequest(vm_id="app"), timeout=5)
    assert status.mapping_complete and status.readiness_level == "complete"
    assert (status.total_mappings, status.live_mappings, status.test_mappings) == (4, 2, 2)


def test_delete_removes_exactly_the_named_mapping(oma):
    factories.context(vm_name="a")
    factories.context(vm_name="b")
    _map(oma, vm_id="a")
    _map(oma, vm_id="a", is_test_network=True)
    _map(oma, vm_id="a", source_network_name="DMZ")
    _map(oma, vm_id="b")
    deleted = oma.network_mappings.DeleteNetworkMapping(pb.DeleteNetworkMappingRequest(
        vm_id="a", source_network_name="VM Network", is_test_network=True), timeout=5)
    assert deleted.deleted_count == 1
    left = sorted((m.vm_id, m.source_network_name, m.is_test_network) for m in models.NetworkMapping.select())
    assert left == [("a", "DMZ", False), ("a", "VM Network", False), ("b", "VM Network", False)]
    # Other columns of the remaining rows are intact (the original re-created them without context ids).
    assert all(m.vm_context_id for m in models.NetworkMapping.select())
    code, _ = _error(lambda: oma.network_mappings.DeleteNetworkMapping(pb.DeleteNetworkMappingRequest(
        vm_id="a", source_network_name="nope"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unique_keys_per_vm_and_per_context(db):
    from peewee import IntegrityError

    ctx = factories.context()
    models.NetworkMapping.create(vm_id="x", vm_context=ctx.context_id, source_network_name="n",
                                 destination_network_id="d", destination_network_name="d")
    for values in (dict(vm_id="x", vm_context=None), dict(vm_id="y", vm_context=ctx.context_id)):
        with pytest.raises(IntegrityError):
            with models.NetworkMapping._meta.database.atomic():
                models.NetworkMapping.create(source_network_name="n", destination_network_id="d",
                                             destination_network_name="d", **values)
