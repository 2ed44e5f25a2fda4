"""Size limits of every request the agent serves, checked before any servicer runs.

Every string, bytes and repeated field of every ``vma.v1`` request has a limit — a default, or a named
exception below for the few fields that are legitimately longer (a CA bundle, a list of VM names) or
must be shorter (ids). The check walks the request message by its descriptor, so a field added to a
proto later is limited without anyone remembering to. A refusal is INVALID_ARGUMENT naming the field
(``connection.ca_pem``, ``disks[3].target_nbd_uri``) and quoting at most 100 characters of it; secrets are
never quoted. Hand-written because it is a short walk over protobuf descriptors; protovalidate would
need every limit annotated in the proto files and a new runtime dependency for the same result.
"""
from __future__ import annotations

from google.protobuf.message import Message

from vma_agent import errors, validation

DEFAULT_STRING_MAX = 1_024
DEFAULT_REPEATED_MAX = 1_000
IDENTIFIER_MAX = validation.IDENTIFIER_MAX

#: Per-field limits (characters for strings, bytes for bytes) that differ from the default.
STRING_MAX: dict[str, int] = {
    "vma.v1.VCenterConnection.ca_pem": 65_536,
    "vma.v1.VMReference.path": 4_096,
    "vma.v1.ReplicationDisk.target_nbd_uri": 2_048,
    "vma.v1.ReplicationDisk.disk_id": IDENTIFIER_MAX,
    "vma.v1.StartReplicationRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.StartReplicationRequest.context_id": IDENTIFIER_MAX,
    "vma.v1.GetReplicationStatusRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.CancelReplicationRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.CleanupSnapshotsRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.GetProgressRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.WatchProgressRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.UpdateProgressRequest.job_id": IDENTIFIER_MAX,
    "vma.v1.UpdateProgressRequest.disk_id": IDENTIFIER_MAX,
    "vma.v1.UpdateProgressRequest.sync_type": 32,
    "vma.v1.UpdateProgressRequest.error_message": 4_096,
    "vma.v1.EnrollRequest.oma_host": validation.HOST_MAX,
    "vma.v1.EnrollRequest.pairing_code": 64,
    "vma.v1.EnrollRequest.vma_name": 255,
    "vma.v1.EnrollRequest.vma_version": 255,
    "vma.v1.EnrollRequest.oma_certificate_sha256": 128,
}
#: Per-field limits on the number of entries of repeated fields.
REPEATED_MAX: dict[str, int] = {
    "vma.v1.DiscoverRequest.names": 10_000,
    # A VMware VM has at most 256 virtual disks.
    "vma.v1.StartReplicationRequest.disks": 256,
}
#: Fields whose value is never quoted in an error message.
SECRET_FIELDS = frozenset({"vma.v1.VCenterConnection.password"})


def check(message: Message, path: str = "") -> None:
    """Raise InvalidArgument for the first field of ``message`` (recursively) over its limit."""
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.is_repeated:
            limit = REPEATED_MAX.get(field.full_name, DEFAULT_REPEATED_MAX)
            if len(value) > limit:
                raise errors.InvalidArgument(f"{name} has {len(value)} entries; at most {limit} are accepted")
            for index, item in enumerate(value):
                _check_value(field, item, f"{name}[{index}]")
        else:
            _check_value(field, value, name)


def _check_value(field, value, name: str) -> None:
    if isinstance(value, Message):
        check(value, f"{name}.")
    elif isinstance(value, (str, bytes)):
        limit = STRING_MAX.get(field.full_name, DEFAULT_STRING_MAX)
        if len(value) > limit:
            unit = "characters" if isinstance(value, str) else "bytes"
            if field.full_name in SECRET_FIELDS:
                raise errors.InvalidArgument(f"{name} is {len(value)} {unit}; at most {limit} are accepted")
            raise validation.Invalid(name, value, f"at most {limit} {unit} (got {len(value)})")
