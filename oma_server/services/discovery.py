from __future__ import annotations

from oma.v1 import discovery_pb2 as pb, discovery_pb2_grpc

from oma_server.convert import fill, timestamp
from oma_server.db.models import utcnow
from oma_server.domain import groups


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, runtime):
        self._runtime = runtime

    def ListUngroupedVMs(self, request, context):
        rows = groups.ungrouped_contexts()
        return pb.ListUngroupedVMsResponse(
            vms=[fill(pb.UngroupedVM(), c) for c in rows], count=len(rows), retrieved_at=timestamp(utcnow())
        )
