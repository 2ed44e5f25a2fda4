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
