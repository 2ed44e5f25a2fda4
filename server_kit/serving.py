"""Building a gRPC server the way both servers do: a bounded thread pool and the kit's interceptor, every
service of a generated contract package registered (the implemented ones with their servicer, the rest
with their generated base class, which answers UNIMPLEMENTED), the standard health service, and
reflection under both names clients use.

Reflection: grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha.ServerReflection``; grpcurl
1.8 asks for v1alpha, newer grpcurl, buf curl and grpc's own tools ask for ``grpc.reflection.v1`` first.
The two protocols are the same messages under another package name, so the v1 service is the same
servicer registered under the v1 name, with v1 message classes built from the installed v1alpha file
(renamed package) so that reflection can also describe the v1 service itself.
"""
from __future__ import annotations

import importlib
import pkgutil
from concurrent import futures
from types import ModuleType
from typing import Any, Mapping, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from server_kit.settings import ConfigError

REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def new_server(interceptor: grpc.ServerInterceptor, max_workers: int, max_concurrent_rpcs: int,
               options: Sequence[tuple[str, Any]] = ()) -> grpc.Server:
    """A server whose calls all pass ``interceptor``; beyond ``max_concurrent_rpcs`` calls fail fast with
    RESOURCE_EXHAUSTED instead of queueing into deadline errors. ``options``: channel arguments (e.g. the
    agent's keep-alive)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[interceptor],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=list(options),
    )


def register_contract(server: grpc.Server, package: ModuleType, implemented: Mapping[str, Any]) -> list[str]:
    """Register every service of the generated ``package`` (e.g. ``oma.v1``): the servicer of
    ``implemented`` (by full service name) or the generated base class. Returns the names, sorted."""
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.endswith("_pb2_grpc"):
            continue
        grpc_module = importlib.import_module(f"{package.__name__}.{info.name}")
        pb2 = importlib.import_module(f"{package.__name__}.{info.name.removesuffix('_grpc')}")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            servicer = implemented.get(service.full_name) or getattr(grpc_module, f"{service.name}Servicer")()
            getattr(grpc_module, f"add_{service.name}Servicer_to_server")(servicer, server)
            names.append(service.full_name)
    return sorted(names)


def add_health_and_reflection(server: grpc.Server, services: list[str]) -> health.HealthServicer:
    """The standard health service (statuses are the caller's to set) and reflection (v1 and v1alpha)
    over ``services``, health and reflection itself."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listed = [*services, health.SERVICE_NAME, REFLECTION_V1_SERVICE_NAME, REFLECTION_V1ALPHA_SERVICE_NAME]
    reflection.enable_server_reflection(listed, server)
    reflection_v1_messages()  # so that reflection describes the v1 service as well
    # The same servicer under the v1 name: the requests and answers are the same bytes on the wire.
    servicer = reflection.ReflectionServicer(listed)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))
    return health_servicer


def reflection_v1_messages() -> tuple[type, type]:
    """``ServerReflectionRequest``/``ServerReflectionResponse`` of ``grpc.reflection.v1`` (added to the default
    descriptor pool once, so reflection can describe the v1 service too)."""
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(_REFLECTION_V1_FILE)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
        old, new = f".{proto.package}.", ".grpc.reflection.v1."
        proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
        proto.options.Clear()
        for message in proto.message_type:
            for field in message.field:
                if field.type_name:
                    field.type_name = field.type_name.replace(old, new)
        for service in proto.service:
            for method in service.method:
                method.input_type = method.input_type.replace(old, new)
                method.output_type = method.output_type.replace(old, new)
        pool.AddSerializedFile(proto.SerializeToString())
        file = pool.FindFileByName(_REFLECTION_V1_FILE)
    return (message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionRequest"]),
            message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionResponse"]))


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on ``address`` (TLS with ``credentials``); the port. An address that cannot be bound stops the
    server and raises :class:`ConfigError` naming it (gRPC itself only says "failed to bind")."""
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        server.stop(None)
        raise ConfigError(f"cannot listen on {address}{' (TLS)' if credentials else ''}: address in use, not local "
                          "or malformed")
    return port
