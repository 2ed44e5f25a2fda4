"""CloudStack API errors and how the real server turns them into responses.

Codes (org.apache.cloudstack.api.ApiErrorCode): 401 UNAUTHORIZED, 431 PARAM_ERROR,
432 UNSUPPORTED_ACTION_ERROR, 530 INTERNAL_ERROR, 531 ACCOUNT_ERROR.
``cserrorcode`` (com.cloud.utils.exception.CSExceptionErrorCode): 4250 CloudRuntimeException,
4350 InvalidParameterValueException, 4365 PermissionDeniedException, 9999 a bare
ServerApiException (parameter parsing, paging, unknown command).

Where the error surfaces differs:

* Synchronous (``ApiServer.handleRequest``): InvalidParameterValueException -> 431/4350,
  PermissionDenied -> 531/4365, ServerApiException keeps its code, anything else -> 530/4250.
* Inside an async job (``ApiAsyncJobDispatcher.runJob``): InvalidParameterValueException becomes a
  ServerApiException(PARAM_ERROR) -> 431, a ServerApiException keeps its code, every other
  exception -> 530.  The job result carries only ``errorcode`` and ``errortext``.
"""
from __future__ import annotations

__all__ = [
    "ApiError",
    "bad_uuid",
    "bad_value",
    "invalid",
    "missing_param",
    "permission_denied",
    "runtime_error",
    "server_error",
]


class ApiError(Exception):
    """An error CloudStack reports for a command.

    kind: ``param`` (InvalidParameterValueException), ``server`` (ServerApiException),
    ``runtime`` (CloudRuntimeException / other), ``permission`` (PermissionDeniedException).
    """

    def __init__(self, errorcode: int, errortext: str, cserrorcode: int | None, kind: str) -> None:
        super().__init__(errortext)
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode
        self.kind = kind

    @property
    def job_errorcode(self) -> int:
        """The code a failed async job reports for this error."""
        if self.kind == "param":
            return 431
        if self.kind == "server":
            return self.errorcode
        return 530

    def __repr__(self) -> str:
        return f"ApiError({self.errorcode}, {self.errortext!r})"


def invalid(text: str) -> ApiError:
    """InvalidParameterValueException thrown by a service."""
    return ApiError(431, text, 4350, "param")


def runtime_error(text: str) -> ApiError:
    """CloudRuntimeException (or any unexpected exception) thrown by a service."""
    return ApiError(530, text, 4250, "runtime")


def permission_denied(text: str) -> ApiError:
    return ApiError(531, text, 4365, "permission")


def server_error(errorcode: int, text: str) -> ApiError:
    """A bare ServerApiException (cserrorcode 9999)."""
    return ApiError(errorcode, text, 9999, "server")


def missing_param(command: str, name: str) -> ApiError:
    """ParamProcessWorker: a required parameter is absent."""
    return server_error(
        431, f"Unable to execute API command {command.lower()} due to missing parameter {name}"
    )


def bad_value(command: str, name: str, value: str) -> ApiError:
    """ParamProcessWorker: a value that does not parse as the parameter's type."""
    return server_error(
        431,
        f"Unable to execute API command {command.lower()} due to invalid value {value} "
        f"for parameter {name}",
    )


def bad_uuid(command: str, name: str, value: str) -> ApiError:
    """ParamProcessWorker.translateUuidToInternalId: no entity of that type has this id."""
    return server_error(
        431,
        f"Unable to execute API command {command.lower()} due to invalid value. Invalid parameter "
        f"{name} value={value} due to incorrect long value format, or entity does not exist or due "
        "to incorrect parameter annotation for the field in api cmd class.",
    )
