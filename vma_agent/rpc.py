"""The agent's parts of the server kit's interceptor (:mod:`server_kit.rpc`): the OMA's shared bearer token
(when configured), the size limits of every request field (:mod:`vma_agent.request_limits`) and the
agent's metrics. The mapping of errors to statuses and the logging of bugs are the kit's."""
from __future__ import annotations

import logging

from server_kit.rpc import CallInterceptor, shared_token
from vma_agent import metrics, request_limits

log = logging.getLogger("vma_agent.rpc")


def AgentInterceptor(auth_token: str) -> CallInterceptor:  # noqa: N802 - the name callers construct
    """The agent's interceptor; an empty ``auth_token`` lets every caller in (loopback only, see config.check)."""
    return CallInterceptor(authenticate=shared_token(auth_token, "this agent requires the OMA's bearer token"),
                           check_request=request_limits.check, record_rpc=metrics.record_rpc,
                           server_name="agent", log=log)
