from __future__ import annotations

from oma.v1 import job_log_pb2 as pb
from oma.v1 import job_log_pb2_grpc

from oma_server.convert import fill, optional
from oma_server.domain import joblog, paging
from oma_server.services import messages


class JobLogServicer(job_log_pb2_grpc.JobLogServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def GetJob(self, request, context):
        job = joblog.find_job(request.job_id)
        return pb.GetJobResponse(job=messages.job(job, joblog.steps_of([job.id])[job.id]))

    def ListJobs(self, request, context):
        query = joblog.list_jobs(
            context_id=request.context_id, statuses=list(request.statuses), job_type=request.job_type,
            category=request.job_category,
            since=optional(request, "since"),
        )
        page = paging.paginate(query, request.page_size, request.page_token)
        steps = joblog.steps_of(j.id for j in page.items) if request.include_steps else {}
        return pb.ListJobsResponse(
            jobs=[messages.job(j, steps.get(j.id) if request.include_steps else None) for j in page.items],
            count=page.total, next_page_token=page.next_page_token,
        )

    def GetJobLogs(self, request, context):
        events = joblog.job_logs(request.job_id, step_id=request.step_id, min_level=request.min_level,
                                 limit=request.limit)
        return pb.GetJobLogsResponse(events=[
            fill(pb.LogEvent(), e, job_id=e.job_id, step_id=e.step_id, attrs=joblog.metadata_json(e.attrs))
            for e in events
        ])
