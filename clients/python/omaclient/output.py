"""How omactl shows things: aligned text for people, the response messages as JSON for scripts.

Everything omactl prints goes through here so the two forms stay in step. ``to_json`` is the one
machine format (google.protobuf.json_format with proto field names and every field present, so a
script never has to guess whether a false or zero field was left out). The rest turns messages into
plain text without a table library: ``table`` for lists, ``fields`` for one record, and per resource
the handful of columns an operator needs at a glance; the full record is always one ``--json`` away.
"""
from __future__ import annotations

import unicodedata
from datetime import timezone
from typing import Any, Callable, Iterable, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

Column = tuple[str, Callable[[Any], Any]]

_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


# --- terminal safety ------------------------------------------------------------------------------
# Characters that must never reach a terminal raw: control characters (ESC sequences, CR, NUL …),
# invisible format characters (bidi overrides such as U+202E, zero-width characters), line and
# paragraph separators, and code points that are private or unassigned. A server may hold such text
# from before it checked its input, or a peer (vCenter, CloudStack) may have sent it.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def printable(value: str, *, keep_newlines: bool = False) -> str:
    """``value`` with every unsafe character written as a visible escape (``\\x1b``, ``\\u202e``);
    ``keep_newlines`` leaves line feeds of multi-line output alone."""
    if value.isprintable():
        return value
    out = []
    for char in value:
        if (keep_newlines and char == "\n") or not _unsafe(char):
            out.append(char)
        elif char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# --- JSON -----------------------------------------------------------------------------------------
def to_json(message: Message, *, compact: bool = False) -> str:
    """The message in proto3 JSON with proto field names; ``compact`` gives one line (JSON Lines).

    Unsafe characters are written as ``\\uXXXX`` escapes: the same JSON value, safe on a terminal
    (the encoder already escapes ASCII controls; this covers the rest, e.g. U+202E).
    """
    text = json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
        indent=None if compact else 2, ensure_ascii=False,
    )
    if text.isprintable() or all(c == "\n" or not _unsafe(c) for c in text):
        return text
    return "".join(_json_escape(c) if c != "\n" and _unsafe(c) else c for c in text)


# --- values ---------------------------------------------------------------------------------------
def text(value: Any) -> str:
    """A cell: '-' for empty, yes/no for booleans, times and numbers readable."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Timestamp):
        return when(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return printable(str(value))


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def size(n_bytes: float) -> str:
    value, unit = float(n_bytes), 0
    while abs(value) >= 1024 and unit < len(_SIZE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_SIZE_UNITS[unit]}"


def rate(bytes_per_second: float) -> str:
    return f"{size(bytes_per_second)}/s" if bytes_per_second > 0 else "-"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds <= 0:
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def percent(value: float) -> str:
    return f"{value:.1f}%"


def elapsed(start: Timestamp, end: Timestamp) -> str:
    if not start.seconds or not end.seconds:
        return "-"
    return duration(end.seconds - start.seconds) if end.seconds > start.seconds else "<1s"


# --- layout ---------------------------------------------------------------------------------------
def table(rows: Iterable[Any], columns: Sequence[Column], *, empty: str = "(none)") -> str:
    """Rows under upper-case headers, columns padded to their widest cell."""
    cells = [[text(get(row)) for _, get in columns] for row in rows]
    if not cells:
        return empty
    headers = [header for header, _ in columns]
    widths = [max(len(header), *(len(line[i]) for line in cells)) for i, header in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *cells]
    )


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """One record as 'Label:  value' lines with the values aligned."""
    width = max(len(label) for label, _ in pairs) + 1
    return "\n".join(f"{label + ':':<{width}}  {text(value)}" for label, value in pairs)


def sections(*parts: tuple[str, str]) -> str:
    """Titled blocks separated by a blank line; the first title may be empty."""
    return "\n\n".join(f"{title}\n{body}" if title else body for title, body in parts)


# --- VM contexts ----------------------------------------------------------------------------------
VM_CONTEXT_COLUMNS: list[Column] = [
    ("NAME", lambda c: c.vm_name),
    ("STATUS", lambda c: c.current_status),
    ("POWER", lambda c: c.power_state),
    ("CPUS", lambda c: c.cpu_count or None),
    ("MEMORY", lambda c: size(c.memory_mb * 1024**2) if c.memory_mb else None),
    ("OS", lambda c: c.os_type),
    ("VCENTER", lambda c: c.vcenter_host),
    ("GROUPS", lambda c: ", ".join(g.group_name for g in c.groups)),
    ("LAST JOB", lambda c: c.last_job_at),
    ("CONTEXT ID", lambda c: c.context_id),
]

VM_DISK_COLUMNS: list[Column] = [
    ("DISK", lambda d: d.disk_id),
    ("LABEL", lambda d: d.label),
    ("SIZE", lambda d: size(d.capacity_bytes) if d.capacity_bytes else f"{d.size_gb} GiB"),
    ("DATASTORE", lambda d: d.datastore),
    ("PROVISIONING", lambda d: d.provisioning_type),
    ("SYNC", lambda d: d.sync_status),
    ("PROGRESS", lambda d: percent(d.sync_progress_percent)),
    ("CHANGE ID", lambda d: d.disk_change_id),
    ("REPLICA VOLUME", lambda d: d.replica_volume_uuid),
]

REPLICATION_COLUMNS: list[Column] = [
    ("JOB ID", lambda j: j.job_id),
    ("VM", lambda j: j.source_vm_name),
    ("TYPE", lambda j: j.replication_type),
    ("STATUS", lambda j: j.status),
    ("PROGRESS", lambda j: percent(j.progress_percent)),
    ("TRANSFERRED", lambda j: size(j.bytes_transferred)),
    ("STARTED", lambda j: j.started_at),
    ("COMPLETED", lambda j: j.completed_at),
]


def vm_context_details(details: Any) -> str:
    c = details.context
    record = fields([
        ("Name", c.vm_name), ("Context ID", c.context_id), ("Status", c.current_status),
        ("vCenter", c.vcenter_host), ("Datacenter", c.datacenter), ("Path", c.vm_path),
        ("VMware ID", c.vmware_vm_id), ("Power", c.power_state), ("CPUs", c.cpu_count or None),
        ("Memory", size(c.memory_mb * 1024**2) if c.memory_mb else None), ("OS", c.os_type),
        ("VMware Tools", c.vm_tools_version),
        ("Groups", ", ".join(g.group_name for g in c.groups)),
        ("Credential", c.credential_id if c.HasField("credential_id") else None),
        ("CloudStack config", c.ossea_config_id if c.HasField("ossea_config_id") else None),
        ("Scheduler", "enabled" if c.scheduler_enabled else "disabled"),
        ("Jobs", f"{c.total_jobs_run} run, {c.successful_jobs} succeeded, {c.failed_jobs} failed"),
        ("Current job", c.current_job_id), ("Last job", c.last_job_at), ("Added", c.created_at),
    ])
    return sections(
        ("", record),
        ("Disks", table(details.disks, VM_DISK_COLUMNS)),
        ("Jobs", table(details.job_history, REPLICATION_COLUMNS)),
    )


# --- replications ---------------------------------------------------------------------------------
DISK_PROGRESS_COLUMNS: list[Column] = [
    ("DISK", lambda d: d.disk_id),
    ("LABEL", lambda d: d.label),
    ("STATUS", lambda d: d.sync_status),
    ("SYNC", lambda d: d.sync_type),
    ("PROGRESS", lambda d: percent(d.sync_progress_percent)),
    ("COPIED", lambda d: f"{size(d.bytes_synced)} of {size(d.total_bytes)}"),
    ("ERROR", lambda d: d.error_message),
]


def replication_details(response: Any) -> str:
    j = response.job
    record = fields([
        ("Job ID", j.job_id), ("VM", j.source_vm_name), ("Context ID", j.vm_context_id),
        ("Type", j.replication_type), ("Status", j.status), ("Progress", percent(j.progress_percent)),
        ("Operation", j.current_operation),
        ("Transferred", f"{size(j.bytes_transferred)} of {size(j.total_bytes)}"),
        ("Created", j.created_at), ("Started", j.started_at), ("Completed", j.completed_at),
        ("Duration", elapsed(j.started_at, j.completed_at)), ("Error", j.error_message),
        ("Tracking job", j.tracking_job_id),
    ])
    return sections(("", record), ("Disks", table(response.disk_progress, DISK_PROGRESS_COLUMNS)))


# --- discovery ------------------------------------------------------------------------------------
DISCOVERED_VM_COLUMNS: list[Column] = [
    ("NAME", lambda d: d.vm.name),
    ("POWER", lambda d: d.vm.power_state),
    ("CPUS", lambda d: d.vm.num_cpu or None),
    ("MEMORY", lambda d: size(d.vm.memory_mb * 1024**2) if d.vm.memory_mb else None),
    ("OS", lambda d: d.vm.guest_os),
    ("DISKS", lambda d: size(sum(disk.capacity_bytes for disk in d.vm.disks))),
    ("MANAGED", lambda d: d.existing),
    ("PATH", lambda d: d.vm.path),
]

PROCESSED_VM_COLUMNS: list[Column] = [
    ("VM", lambda p: p.vm_name),
    ("OUTCOME", lambda p: p.outcome),
    ("CONTEXT ID", lambda p: p.context_id or p.existing_context_id),
    ("REASON", lambda p: p.reason),
]


# --- vCenter credentials --------------------------------------------------------------------------
CREDENTIAL_COLUMNS: list[Column] = [
    ("ID", lambda c: c.id),
    ("NAME", lambda c: c.credential_name),
    ("VCENTER", lambda c: c.vcenter_host),
    ("USERNAME", lambda c: c.username),
    ("DATACENTER", lambda c: c.datacenter),
    ("ACTIVE", lambda c: c.is_active),
    ("DEFAULT", lambda c: c.is_default),
    ("VMS", lambda c: c.context_count),
    ("LAST USED", lambda c: c.last_used),
]


def credential_details(c: Any) -> str:
    tls = "not verified (insecure)" if c.tls_insecure else (f"pinned {c.tls_thumbprint}" if c.tls_thumbprint
                                                             else "system trust store")
    return fields([
        ("ID", c.id), ("Name", c.credential_name), ("vCenter", c.vcenter_host), ("Username", c.username),
        ("Datacenter", c.datacenter), ("TLS", tls), ("Active", c.is_active), ("Default", c.is_default),
        ("VMs using it", c.context_count), ("Used", f"{c.usage_count} times, last {when(c.last_used)}"),
        ("Created", f"{when(c.created_at)} by {text(c.created_by)}"), ("Updated", c.updated_at),
    ])


# --- CloudStack -----------------------------------------------------------------------------------
CLOUDSTACK_CONFIG_COLUMNS: list[Column] = [
    ("ID", lambda c: c.id),
    ("NAME", lambda c: c.name),
    ("API URL", lambda c: c.api_url),
    ("ZONE", lambda c: c.zone),
    ("DOMAIN", lambda c: c.domain),
    ("API KEY", lambda c: c.api_key_hint),
    ("OMA VM", lambda c: c.oma_vm_id),
    ("ACTIVE", lambda c: c.is_active),
]


def cloudstack_config_details(c: Any) -> str:
    return fields([
        ("ID", c.id), ("Name", c.name), ("Active", c.is_active), ("API URL", c.api_url),
        ("API key", c.api_key_hint), ("Zone", c.zone), ("Domain", c.domain), ("OMA VM", c.oma_vm_id),
        ("Template", c.template_id), ("Network", c.network_id),
        ("Compute offering", c.service_offering_id), ("Disk offering", c.disk_offering_id),
        ("Created", c.created_at), ("Updated", c.updated_at),
    ])


_ID_NAME: list[Column] = [("ID", lambda r: r.id), ("NAME", lambda r: r.name)]


def cloudstack_resources(r: Any) -> str:
    oma_vm = f"{r.oma_vm_name} ({r.oma_vm_id})" if r.oma_vm_id else "not detected"
    parts = [
        ("", fields([("OMA VM", oma_vm)])),
        ("Zones", table(r.zones, _ID_NAME)),
        ("Templates", table(r.templates, [*_ID_NAME, ("OS", lambda t: t.os_type),
                                          ("SIZE", lambda t: f"{t.size_gb} GiB")])),
        ("Compute offerings", table(r.service_offerings, [
            *_ID_NAME, ("CPUS", lambda o: o.cpu or None), ("MEMORY MIB", lambda o: o.memory or None),
            ("CUSTOM", lambda o: o.is_customized)])),
        ("Disk offerings", table(r.disk_offerings, [
            *_ID_NAME, ("SIZE", lambda o: f"{o.disk_size_gb} GiB" if o.disk_size_gb else None),
            ("CUSTOM", lambda o: o.is_customized)])),
        ("Networks", table(r.networks, [*_ID_NAME, ("ZONE", lambda n: n.zone_name), ("STATE", lambda n: n.state)])),
    ]
    if r.warnings:
        parts.append(("Warnings", "\n".join(r.warnings)))
    return sections(*parts)


def cloudstack_validation(response: Any) -> str:
    result = response.result
    checks = [("OMA VM", result.oma_vm), ("Compute offering", result.compute_offering),
              ("Account", result.account_match), ("Network", result.network)]
    return sections(
        ("", fields([("Overall", result.overall_status), ("OMA VM id", result.oma_vm_id),
                     ("Message", response.message)])),
        ("Checks", table(checks, [("CHECK", lambda c: c[0]), ("STATUS", lambda c: c[1].status),
                                  ("MESSAGE", lambda c: c[1].message)])),
    )


# --- network mappings -----------------------------------------------------------------------------
NETWORK_MAPPING_COLUMNS: list[Column] = [
    ("VM", lambda m: m.vm_id),
    ("SOURCE NETWORK", lambda m: m.source_network_name),
    ("DESTINATION", lambda m: f"{m.destination_network_name} ({m.destination_network_id})"
     if m.destination_network_name != m.destination_network_id else m.destination_network_id),
    ("FOR", lambda m: "test" if m.is_test_network else "live"),
    ("TYPE", lambda m: m.mapping_type),
    ("VALIDATION", lambda m: m.validation_status),
    ("ID", lambda m: m.id),
]


def network_mapping_status(s: Any) -> str:
    return fields([
        ("VM", s.vm_id), ("Context ID", s.vm_context_id), ("Readiness", s.readiness_level),
        ("Complete", s.mapping_complete),
        ("Mappings", f"{s.total_mappings} ({s.live_mappings} live, {s.test_mappings} test)"),
        ("Source networks", ", ".join(s.source_networks)),
        ("Unmapped (live)", ", ".join(s.unmapped_live_networks)),
        ("Unmapped (test)", ", ".join(s.unmapped_test_networks)),
    ])


# --- machine groups -------------------------------------------------------------------------------
GROUP_COLUMNS: list[Column] = [
    ("NAME", lambda g: g.name),
    ("VMS", lambda g: g.total_vms),
    ("ENABLED", lambda g: g.enabled_vms),
    ("PRIORITY", lambda g: g.priority),
    ("MAX CONCURRENT", lambda g: g.max_concurrent_vms),
    ("SCHEDULE", lambda g: g.schedule_name or g.schedule_id),
    ("ACTIVE JOBS", lambda g: g.active_jobs),
    ("ID", lambda g: g.id),
]

MEMBERSHIP_COLUMNS: list[Column] = [
    ("VM", lambda m: m.vm_name),
    ("ENABLED", lambda m: m.enabled),
    ("PRIORITY", lambda m: m.priority),
    ("SCHEDULE OVERRIDE", lambda m: m.schedule_override_id),
    ("ADDED", lambda m: m.added_at),
    ("CONTEXT ID", lambda m: m.vm_context_id),
]


def group_details(g: Any) -> str:
    last = g.last_execution
    record = fields([
        ("Name", g.name), ("ID", g.id), ("Description", g.description),
        ("Schedule", f"{g.schedule.name} ({g.schedule.cron_expression})" if g.HasField("schedule") else None),
        ("Priority", g.priority), ("Max concurrent VMs", g.max_concurrent_vms),
        ("VMs", f"{g.total_vms} ({g.enabled_vms} enabled, {g.disabled_vms} disabled)"),
        ("Active jobs", g.active_jobs),
        ("Last execution", f"{last.status} at {when(last.scheduled_at)}" if g.HasField("last_execution") else None),
        ("Created", f"{when(g.created_at)} by {text(g.created_by)}"),
    ])
    return sections(("", record), ("Members", table(g.memberships, MEMBERSHIP_COLUMNS)))


# --- JobLog ---------------------------------------------------------------------------------------
JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.id),
    ("TYPE", lambda j: j.job_type),
    ("OPERATION", lambda j: j.operation),
    ("STATUS", lambda j: j.status),
    ("%", lambda j: j.percent_complete),
    ("STARTED", lambda j: j.started_at),
    ("DURATION", lambda j: elapsed(j.started_at, j.completed_at)),
    ("OWNER", lambda j: j.owner),
]

JOB_STEP_COLUMNS: list[Column] = [
    ("#", lambda s: s.seq),
    ("STEP", lambda s: s.name),
    ("STATUS", lambda s: s.status),
    ("STARTED", lambda s: s.started_at),
    ("DURATION", lambda s: elapsed(s.started_at, s.completed_at)),
    ("ERROR", lambda s: s.error_message),
]


def job_details(j: Any) -> str:
    p = j.progress
    record = fields([
        ("ID", j.id), ("Type", j.job_type), ("Operation", j.operation), ("Category", j.job_category),
        ("Status", j.status), ("Progress", f"{p.completed_steps}/{p.total_steps} steps, "
                                           f"{percent(p.step_completion_percentage)}"),
        ("Context ID", j.context_id), ("External ID", j.external_job_id), ("Parent job", j.parent_job_id),
        ("Owner", j.owner), ("Started", j.started_at), ("Completed", j.completed_at),
        ("Duration", elapsed(j.started_at, j.completed_at)), ("Error", j.error_message),
    ])
    return sections(("", record), ("Steps", table(j.steps, JOB_STEP_COLUMNS)))


# --- failover -------------------------------------------------------------------------------------
FAILOVER_JOB_COLUMNS: list[Column] = [
    ("JOB ID", lambda j: j.job_id),
    ("VM", lambda j: j.vm_name),
    ("TYPE", lambda j: j.job_type),
    ("STATUS", lambda j: j.status),
    ("PROGRESS", lambda j: f"{j.progress}%"),
    ("DESTINATION VM", lambda j: j.destination_vm_id),
    ("STARTED", lambda j: j.started_at if j.started_at.seconds else j.created_at),
    ("DURATION", lambda j: duration(j.duration_seconds) if j.duration_seconds > 0 else None),
    ("ERROR", lambda j: j.error_message),
]

FAILOVER_STEP_COLUMNS: list[Column] = [
    ("#", lambda s: s.seq),
    ("STEP", lambda s: s.display_name or s.name),
    ("STATUS", lambda s: s.status),
    ("DURATION", lambda s: elapsed(s.started_at, s.completed_at)),
    ("ERROR", lambda s: s.error_message),
]

# pass | fail | warning | skip as people read them in a column
_CHECK_STATUS = {"pass": "pass", "fail": "FAIL", "warning": "warn", "skip": "skip"}

READINESS_CHECK_COLUMNS: list[Column] = [
    ("CHECK", lambda c: c.check_name),
    ("STATUS", lambda c: _CHECK_STATUS.get(c.status, c.status)),
    ("TYPE", lambda c: c.check_type),
    ("MESSAGE", lambda c: c.message),
]


def failover_vm_name(job: Any, record: Any = None) -> str:
    """The VM a failover, cleanup or rollback job is about (the record, else the job's metadata)."""
    if record is not None and record.source_vm_name:
        return record.source_vm_name
    fields_ = job.metadata.fields
    return fields_["vm_name"].string_value if "vm_name" in fields_ else ""


def expected_steps(job: Any) -> int:
    """Steps the job will have when its workflow said so (metadata ``expected_steps``), else 0: unknown."""
    fields_ = job.metadata.fields
    expected = int(fields_["expected_steps"].number_value) if "expected_steps" in fields_ else 0
    return expected if expected >= len(job.steps) else 0


def failover_status(r: Any) -> str:
    """GetFailoverStatusResponse: the job, the failover record and the steps."""
    job, record = r.job, r.failover_job
    has_record = r.HasField("failover_job")
    pairs: list[tuple[str, Any]] = [
        ("Job ID", r.job_id), ("External ID", r.external_job_id),
        ("Operation", job.operation if r.HasField("job") else None),
        ("VM", failover_vm_name(job, record if has_record else None)), ("Context ID", r.context_id),
        ("Status", r.status), ("Progress", f"{r.progress}%"),
    ]
    if has_record:
        pairs += [("Failover job", record.job_id), ("Failover type", record.job_type),
                  ("Failover status", record.status), ("Destination VM", destination_vm(record))]
    pairs += [("Started", r.started_at), ("Duration", duration(r.duration_seconds) if r.duration_seconds > 0 else None),
              ("Error", job.error_message or (record.error_message if has_record else ""))]
    parts = [("", fields(pairs))]
    if r.HasField("job"):
        parts.append(("Steps", table(job.steps, FAILOVER_STEP_COLUMNS, empty="no steps yet")))
    return sections(*parts)


def readiness(r: Any) -> str:
    kind = r.failover_type or "live"
    failed = [c for c in r.checks if c.status == "fail"]
    if r.is_valid:
        verdict = f"{r.vm_name} is ready for a {kind} failover (score {r.readiness_score}%)"
        if r.estimated_duration_seconds:
            verdict += f"; estimated duration {duration(r.estimated_duration_seconds)}"
    else:
        verdict = (f"{r.vm_name} is NOT ready for a {kind} failover: {len(failed)} check(s) failed "
                   f"(score {r.readiness_score}%)")
    parts = [("", table(r.checks, READINESS_CHECK_COLUMNS, empty="no checks")), ("", verdict)]
    if r.required_actions:
        parts.append(("Required actions", "\n".join(f"- {a}" for a in r.required_actions)))
    if r.validation_warnings:
        parts.append(("Warnings", "\n".join(f"- {w}" for w in r.validation_warnings)))
    return sections(*parts)


# --- schedules ------------------------------------------------------------------------------------
SCHEDULE_COLUMNS: list[Column] = [
    ("NAME", lambda s: s.name),
    ("CRON", lambda s: s.cron_expression if s.schedule_type != "chain" else f"after {s.chain_parent_schedule_id}"),
    ("TIMEZONE", lambda s: s.timezone),
    ("TYPE", lambda s: s.replication_type),
    ("ENABLED", lambda s: s.enabled),
    ("NEXT RUN", lambda s: s.next_execution),
    ("LAST RUN", lambda s: s.last_execution),
    ("GROUPS", lambda s: s.group_count),
    ("VMS", lambda s: s.vm_count),
    ("ID", lambda s: s.id),
]

SCHEDULE_EXECUTION_COLUMNS: list[Column] = [
    ("EXECUTION ID", lambda e: e.id),
    ("STATUS", lambda e: e.status),
    ("TYPE", lambda e: e.execution_type),
    ("SCHEDULED", lambda e: e.scheduled_at),
    ("DURATION", lambda e: duration(e.execution_duration_seconds) if e.execution_duration_seconds > 0 else None),
    ("VMS", lambda e: e.vms_eligible),
    ("JOBS", lambda e: e.jobs_created),
    ("OK", lambda e: e.jobs_completed),
    ("FAILED", lambda e: e.jobs_failed),
    ("SKIPPED", lambda e: e.jobs_skipped),
    ("BY", lambda e: e.triggered_by),
    ("ERROR", lambda e: e.error_message),
]


def schedule_details(s: Any) -> str:
    if s.schedule_type == "chain":
        when_ = f"{s.chain_delay_minutes} min after each execution of {s.chain_parent_schedule_id}"
    else:
        when_ = f"{s.cron_expression} ({s.timezone})"
    return fields([
        ("Name", s.name), ("ID", s.id), ("Description", s.description), ("Type", s.schedule_type),
        ("Runs", when_), ("Replication", s.replication_type), ("Enabled", s.enabled),
        ("Next run", s.next_execution), ("Last run", s.last_execution),
        ("Max concurrent jobs", s.max_concurrent_jobs),
        ("Retries", f"{s.retry_attempts}, {s.retry_delay_minutes} min apart"),
        ("Skip if running", s.skip_if_running),
        ("Groups", s.group_count), ("VMs", s.vm_count),
        ("Created", f"{when(s.created_at)} by {text(s.created_by)}"), ("Updated", s.updated_at),
    ])


def scheduler_status(r: Any) -> str:
    record = fields([
        ("Scheduler", "running" if r.is_running else "stopped"), ("Started", r.started_at),
        ("Active schedules", r.active_schedules),
        ("Running executions", f"{r.running_executions} (at most {r.max_concurrent_executions})"),
        ("Last reload", r.last_reload_at),
    ])
    registrations = table(r.registrations, [
        ("SCHEDULE", lambda g: g.schedule_name), ("NEXT RUN", lambda g: g.next_run), ("LAST RUN", lambda g: g.last_run),
        ("RUNNING", lambda g: g.is_running), ("FIRINGS", lambda g: g.job_count), ("ID", lambda g: g.schedule_id),
    ], empty="no schedules registered")
    return sections(("", record), ("Registered", registrations))


# --- VMA enrollment -------------------------------------------------------------------------------
ENROLLMENT_COLUMNS: list[Column] = [
    ("ID", lambda e: e.id),
    ("VMA", lambda e: e.vma_name),
    ("VERSION", lambda e: e.vma_version),
    ("FINGERPRINT", lambda e: e.vma_fingerprint),
    ("ADDRESS", lambda e: e.vma_ip_address),
    ("STATUS", lambda e: e.status),
    ("ENROLLED", lambda e: e.created_at),
    ("EXPIRES", lambda e: e.expires_at),
]

USER_COLUMNS: list[Column] = [
    ("USERNAME", lambda u: u.username),
    ("ROLE", lambda u: u.role),
    ("ACTIVE", lambda u: u.is_active),
    ("CREATED", lambda u: u.created_at),
    ("TOKENS VALID AFTER", lambda u: u.tokens_valid_after),
]


VMA_CONNECTION_COLUMNS: list[Column] = [
    ("ENROLLMENT ID", lambda c: c.enrollment_id),
    ("VMA", lambda c: c.vma_name),
    ("STATUS", lambda c: c.connection_status),
    ("TUNNEL USER", lambda c: c.ssh_user),
    ("REVERSE PORT", lambda c: c.reverse_tunnel_port or None),
    ("FINGERPRINT", lambda c: c.vma_fingerprint),
    ("CONNECTED", lambda c: c.connected_at),
    ("LAST SEEN", lambda c: c.last_seen_at),
    ("REVOKED", lambda c: f"{when(c.revoked_at)} by {text(c.revoked_by)}" if c.revoked_at.seconds else None),
]


def _event_details(event: Any) -> str:
    values = json_format.MessageToDict(event.event_details)
    return ", ".join(f"{key}={value}" for key, value in sorted(values.items()))


VMA_AUDIT_COLUMNS: list[Column] = [
    ("TIME", lambda e: e.created_at),
    ("EVENT", lambda e: e.event_type),
    ("BY", lambda e: e.approved_by),
    ("FROM", lambda e: e.source_ip),
    ("ENROLLMENT ID", lambda e: e.enrollment_id),
    ("DETAILS", _event_details),
]


def destination_vm(record: Any) -> str:
    """The destination CloudStack VM of a failover record: 'display name (uuid)', or '' before it exists."""
    if not record.destination_vm_id:
        return ""
    spec = record.source_vm_spec.fields
    name = spec["destination_name"].string_value if "destination_name" in spec else ""
    return f"{name} ({record.destination_vm_id})" if name else record.destination_vm_id
