"""Whatever a caller sends, a built RPC never answers INTERNAL/UNKNOWN, and a rejected request
(INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION) leaves the database exactly as it
was. Requests are generated from the message descriptors (random and known ids mixed, so some calls
hit real rows), against the real server on both databases.

RPCs that take an address to connect to (explicit vCenter or CloudStack endpoints) are left out: random
hosts would only measure the resolver's patience; their validation is tested with real peers elsewhere.
"""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oma.v1 import discovery_pb2

from oma_server.db import models
from oma_server.services import IMPLEMENTED
from omaclient.client import OmaClient
from tests import factories

TALKS_TO_CALLER_ADDRESSES = {
    "CloudStackSettingsService.TestConnection", "CloudStackSettingsService.DetectOMAVM",
    "CloudStackSettingsService.ValidateSettings", "CloudStackSettingsService.DiscoverAllResources",
    "OSSEAConfigService.TestConfig", "OSSEAConfigService.DiscoverResources",
    "OSSEAConfigService.SaveStreamlinedConfig", "DiscoveryService.DiscoverVMs", "DiscoveryService.AddVMs",
    "DiscoveryService.BulkAddVMs", "DiscoveryService.PreviewDiscovery",
}
REJECTIONS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
              grpc.StatusCode.FAILED_PRECONDITION}
KNOWN_STRINGS = ["ctx-known-1", "vm-known", "disk-2000", "job-known-1", "group-known", "vcenter.lab", "DC0",
                 "completed", "failed", "initial", "incremental", "live", "test", "VM Network", "net-1", ""]


def _unary_methods():
    import importlib
    import pkgutil

    import oma.v1

    for info in pkgutil.iter_modules(oma.v1.__path__):
        if not info.name.endswith("_pb2") or info.name.endswith("_grpc"):
            continue
        module_name = info.name.removesuffix("_pb2")
        module = importlib.import_module(f"oma.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in IMPLEMENTED or service.full_name == "oma.v1.AuthService":
                continue
            for method in service.methods:
                if method.server_streaming or f"{service.name}.{method.name}" in TALKS_TO_CALLER_ADDRESSES:
                    continue
                yield module_name, service.name, method


METHODS = list(_unary_methods())


def _scalar(fd: FieldDescriptor):
    if fd.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(KNOWN_STRINGS), st.text(max_size=24))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values])
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    bits = 31 if fd.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32) \
        else 62
    return st.one_of(st.integers(min_value=-3, max_value=3), st.integers(min_value=-(2**bits), max_value=2**bits - 1))


def message_strategy(descriptor, depth: int = 0):
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1)).map(_timestamp)
    fields = {}
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if value.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 2:
                    continue
                values = message_strategy(value.message_type, depth + 1)
            else:
                values = _scalar(value)
            fields[fd.name] = st.one_of(st.none(), st.dictionaries(_scalar(key), values, max_size=3))
            continue
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            value = message_strategy(fd.message_type, depth + 1)
        else:
            value = _scalar(fd)
        if fd.is_repeated:
            value = st.lists(value, max_size=3)
        fields[fd.name] = st.one_of(st.none(), value)

    def build(values):
        from google.protobuf import message_factory

        message = message_factory.GetMessageClass(descriptor)()
        for name, value in values.items():
            if value is None:
                continue
            fd = descriptor.fields_by_name[name]
            if isinstance(value, dict):
                target = getattr(message, name)
                for k, v in value.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(message, name).extend(value)
                else:
                    getattr(message, name).extend(value)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def _timestamp(value: dt.datetime):
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


@pytest.mark.parametrize("module_name,service_name,method", METHODS,
                         ids=[f"{s}.{m.name}" for _, s, m in METHODS])
def test_random_requests_never_fail_internally_and_rejections_change_nothing(module_name, service_name, method,
                                                                              oma: OmaClient):
    ctx = factories.context(context_id="ctx-known-1", vm_name="vm-known")
    factories.disk(ctx)
    factories.replication_job(ctx, id="job-known-1")
    models.VmMachineGroup.create(id="group-known", name="group-known")
    import importlib

    stub_module = importlib.import_module(f"oma.v1.{module_name}_pb2_grpc")
    stub = getattr(stub_module, f"{service_name}Stub")(oma.channel)
    call = getattr(stub, method.name)

    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(message_strategy(method.input_type))
    def check(request):
        before = factories.db_snapshot()
        try:
            call(request, timeout=20)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
                (method.full_name, request, exc.details())
            if exc.code() in REJECTIONS:
                assert factories.db_snapshot() == before, (method.full_name, request, exc.code(), exc.details())

    check()
    # The server is still healthy afterwards.
    oma.discovery.ListUngroupedVMs(discovery_pb2.ListUngroupedVMsRequest(), timeout=10)


# --- hostile text in every field of every RPC (issue 9, items 7 and 8) ---------------------------------
def _all_unary_methods():
    import importlib
    import pkgutil

    import oma.v1

    for info in pkgutil.iter_modules(oma.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"oma.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in IMPLEMENTED:
                continue
            for method in service.methods:
                if factories.string_fields(method.input_type):
                    yield info.name.removesuffix("_pb2"), service.name, method


ALL_METHODS = list(_all_unary_methods())


def _stub_call(oma: OmaClient, module_name: str, service_name: str, method):
    import importlib

    stub = getattr(importlib.import_module(f"oma.v1.{module_name}_pb2_grpc"), f"{service_name}Stub")(oma.channel)
    return getattr(stub, method.name)


def _send(call, method, request):
    response = call(request, timeout=20)
    if method.server_streaming:
        next(iter(response), None)
    return response


def test_hostile_text_in_any_field_is_invalid_argument_and_writes_nothing(oma: OmaClient):
    """NUL, CR/LF, ESC sequences, a right-to-left override or a megabyte, in any string field of any
    request of every service (addresses, names, ids, filters, nested and repeated fields, map keys and
    values): the answer is INVALID_ARGUMENT with a short message naming the field, and nothing is
    written. No vCenter or CloudStack is reached: the check comes before the handler. (One server
    for all methods: a server per method would cost more than the calls.)"""
    from google.protobuf import message_factory

    from oma_server.request_rules import SECRET_FIELDS

    factories.context(context_id="ctx-known-1", vm_name="vm-known")
    before = factories.db_snapshot()  # compared at the end: any write by any call would still be there
    checked = 0
    for module_name, service_name, method in ALL_METHODS:
        call = _stub_call(oma, module_name, service_name, method)
        request_class = message_factory.GetMessageClass(method.input_type)
        for path, fd in factories.string_fields(method.input_type):
            hostile = factories.HOSTILE_SECRET if fd.name in SECRET_FIELDS else factories.HOSTILE_TEXT
            for kind, value in hostile.items():
                request = request_class()
                factories.set_text(request, path, value)
                with pytest.raises(grpc.RpcError) as err:
                    _send(call, method, request)
                where = (method.full_name, ".".join(path), kind)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (*where, err.value.details())
                details = err.value.details()
                assert len(details) < 300 and path[-1] in details, (*where, details[:300])
                assert not any(c in details for c in "\x00\r\x1b\u202e"), where
                checked += 1
    assert factories.db_snapshot() == before
    assert checked > 1000  # every service's fields were reached


def test_a_megabyte_id_is_refused_briefly_and_a_long_unknown_id_is_quoted_briefly(oma: OmaClient):
    from oma.v1 import machine_groups_pb2, vm_contexts_pb2

    huge = "ctx-" + "x" * (1 << 20)
    with pytest.raises(grpc.RpcError) as err:
        oma.contexts.GetVMContext(vm_contexts_pb2.GetVMContextRequest(context_id=huge), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 200
    assert "context_id" in err.value.details()
    long_unknown = "g" * 250  # within the id bound, unknown: NOT_FOUND quoting at most ~100 characters of it
    with pytest.raises(grpc.RpcError) as err:
        oma.groups.GetGroup(machine_groups_pb2.GetGroupRequest(id=long_unknown), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "g" * 100 in err.value.details() and "g" * 101 not in err.value.details()
    assert len(err.value.details()) < 250


def test_name_limits_come_from_the_columns_and_free_text_keeps_its_lines(oma: OmaClient):
    from oma.v1 import machine_groups_pb2, schedules_pb2
    from oma.v1 import vmware_credentials_pb2 as cred_pb2

    limit = models.VmMachineGroup.name.max_length
    assert limit == models.ReplicationSchedule.name.max_length == models.VmwareCredential.credential_name.max_length

    def credential(name):
        return oma.credentials.CreateCredential(cred_pb2.CreateCredentialRequest(
            credential_name=name, vcenter_host="vc.lab", username="u", password="p", datacenter="DC0"), timeout=10)

    creates = [
        lambda name: oma.groups.CreateGroup(machine_groups_pb2.CreateGroupRequest(name=name), timeout=10),
        lambda name: oma.schedules.CreateSchedule(schedules_pb2.CreateScheduleRequest(
            name=name, cron_expression="0 2 * * *"), timeout=10),
        credential,
    ]
    for create in creates:
        code = factories.refused_without_writes(lambda: create("n" * (limit + 1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        create("n" * limit)  # exactly the column's size fits, on both databases
    group = oma.groups.CreateGroup(machine_groups_pb2.CreateGroupRequest(
        name="wave-2", description="first line\n\tsecond line"), timeout=10).group
    assert models.VmMachineGroup.get_by_id(group.id).description == "first line\n\tsecond line"


def test_longest_accepted_text_in_any_field_never_fails_internally(oma: OmaClient):
    """Text as long as the request check lets through (longer than any column) in any field of any
    request, next to ids of existing rows so the calls get past their lookups: refused cleanly by a
    column check, or stored — never INTERNAL (MariaDB's strict 'data too long')."""
    from google.protobuf import message_factory

    from oma_server.request_rules import TEXT_MAX_CHARS

    ctx = factories.context(context_id="ctx-known-1", vm_name="vm-known")
    factories.replication_job(ctx, id="job-known-1")
    models.VmMachineGroup.create(id="group-known", name="group-known")
    known = {"context_id": "ctx-known-1", "vm_context_id": "ctx-known-1", "job_id": "job-known-1",
             "group_id": "group-known", "vm_name": "vm-known"}
    for module_name, service_name, method in ALL_METHODS:
        call = _stub_call(oma, module_name, service_name, method)
        request_class = message_factory.GetMessageClass(method.input_type)
        for path, fd in factories.string_fields(method.input_type):
            request = request_class()
            for name, value in known.items():
                if name in request.DESCRIPTOR.fields_by_name and (name,) != path:
                    setattr(request, name, value)
            is_id = fd.name.endswith(("_id", "_ids")) or fd.name == "id"
            factories.set_text(request, path, "x" * (255 if is_id else TEXT_MAX_CHARS))
            before = factories.db_snapshot()
            try:
                _send(call, method, request)
            except grpc.RpcError as exc:
                assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
                    (method.full_name, ".".join(path), exc.details())
                if exc.code() in REJECTIONS:
                    assert factories.db_snapshot() == before, (method.full_name, ".".join(path))
