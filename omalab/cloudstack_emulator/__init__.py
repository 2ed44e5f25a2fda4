"""A hand-written emulator of the Apache CloudStack management-server API, for tests and the lab demo.

Why hand-written: no CloudStack simulator can be reached from this offline build.  The real
simulator needs a Maven build of CloudStack; PyPI/npm/Debian only ship *clients* (``cs``,
``cloudstack-marvin``, ``csclient``, go-cloudstack).  So the OMA server's CloudStack code (which
uses the ``cs`` library) is tested against this emulator, written to behave like CloudStack's
``ApiServlet``/``ApiServer`` wherever our code can tell the difference:

* ``GET``/``POST`` (form) ``/client/api``; parameters as the servlet sees them (first value wins).
* Signatures verified exactly as ``ApiServer.verifyRequest``: sorted names, Java ``URLEncoder``
  values, lower-cased, HMAC-SHA1 with the user's secret key, Base64; ``signatureVersion=3`` needs a
  future ``expires``.  Failures answer HTTP 401 ``unable to verify user credentials and/or request
  signature``.  Unknown commands answer 432 (CloudStack <= 4.9 wording, the default) or 401 like
  later releases (``unknown_command_status=401``).
* JSON envelopes ``{"<command>response": {...}}``; lists ``{"count": N, "<item>": [...]}``, ``{}``
  when empty, ``{"count": N}`` past the last page; ``page``/``pagesize`` rules of BaseListCmd.
* Errors ``{"uuidList": [], "errorcode", "cserrorcode", "errortext"}`` with HTTP status =
  errorcode: 431 parameter errors (cserrorcode 9999 from parameter parsing, 4350 from services),
  530 internal errors (4250), 531 permission errors, 432 unknown command.
* Async commands answer ``{"jobid"}`` (``{"id", "jobid"}`` for create commands) and really run
  later (``job_delay``, default 0.2 s); ``queryAsyncJobResult`` reports jobstatus 0/1/2 with
  ``jobresult``/``jobresultcode``/``jobresulttype``/``cmd``/``jobinstancetype``/``jobinstanceid``.
* Volumes are sparse files ``<state_dir>/volumes/<uuid>.img``; attaching one to the OMA appliance
  VM makes ``<byid_dir>/virtio-<first 20 hex of the uuid>`` point at it, like a KVM guest's
  ``/dev/disk/by-id``; snapshots are sparse copies that ``revertSnapshot`` writes back in place.
* List scoping as CloudStack: users see their own resources; admins their own unless ``listall``,
  an ``id`` or ``account``/``domainid`` is given.  ``listVirtualMachines name=`` is a substring
  match; templates are listed once per zone.

Deliberately not emulated: XML responses beyond a rough rendering, session (login) auth, the
unauthenticated integration port, projects, tags, events, usage, resource limits and capacity
planning (deploys never run out of capacity), hosts/pods/clusters/storage pools (a fixed host and
pool name appear in responses), security groups, VM snapshots, volumes from snapshots, ISO
handling, network creation/IP management beyond one address per NIC, HA, and expunge delays
(``expunge=true`` removes at once; ``expunge=false`` leaves the VM ``Destroyed`` forever).  Error
texts for rarer validations are close paraphrases of CloudStack's.  State other than volume and
snapshot contents lives in memory and is re-seeded on start/``reset()``.

Public API::

    from omalab.cloudstack_emulator import CloudStackEmulator, local_mac, sign_params
    with CloudStackEmulator(tmp_path, oma_mac=local_mac()) as emu:
        client = emu.client(fetch_result=True)     # cs.CloudStack bound to emu.url/keys
        emu.fail("attachVolume", times=1, errorcode=530, async_job=True)
        emu.calls["createVolume"]

Run for the lab: ``python -m omalab.cloudstack_emulator --port 0 --state-dir DIR`` prints one JSON
line (url, keys, ids) and serves until SIGINT/SIGTERM.
"""
from .commands import COMMANDS as _COMMANDS
from .errors import ApiError
from .server import AUTH_ERROR_TEXT, UNKNOWN_COMMAND_TEXT, CloudStackEmulator
from .signing import compute_signature, java_urlencode, sign_params, string_to_sign
from .storage import byid_name, local_mac, local_macs

COMMAND_NAMES: tuple[str, ...] = tuple(sorted(_COMMANDS))
"""The API commands the emulator implements."""

__all__ = [
    "AUTH_ERROR_TEXT",
    "COMMAND_NAMES",
    "UNKNOWN_COMMAND_TEXT",
    "ApiError",
    "CloudStackEmulator",
    "byid_name",
    "compute_signature",
    "java_urlencode",
    "local_mac",
    "local_macs",
    "sign_params",
    "string_to_sign",
]
