from __future__ import annotations

from oma.v1 import progress_pb2 as pb
from oma.v1 import progress_pb2_grpc

from oma_server.db.database import database_proxy as db
from oma_server.domain import replications
from oma_server.errors import require
from oma_server.integrations.vma_client import VmaClient
from oma_server.services.replications import progress_message
from oma_server.workflows.hub import ProgressHub

# How often a watcher re-reads the database even without a wake-up (another OMA may own the job).
_POLL_SECONDS = 1.0


class ProgressServicer(progress_pb2_grpc.ProgressServiceServicer):

    def __init__(self, vma: VmaClient, hub: ProgressHub):
        self._vma, self._hub = vma, hub

    def GetVMAProgress(self, request, context):
        require(request.job_id, "job_id is required")
        return pb.GetVMAProgressResponse(progress=self._vma.get_progress(request.job_id))

    def WatchReplicationProgress(self, request, context):
        """The job's progress now, then on every change, until it ends. One short database read per
        change; no connection is held between updates."""
        require(request.job_id, "job_id is required")
        hub = self._hub
        last = None
        seen = hub.version(request.job_id)
        while context.is_active():
            with db.connection_context():
                message = progress_message(replications.get(request.job_id))
            if message != last:
                yield pb.WatchReplicationProgressResponse(progress=message)
                last = message
            if message.terminal:
                return
            seen = hub.wait(request.job_id, seen, _POLL_SECONDS)
