"""CloudStack through the ``cs`` library: the only module that imports it.

``cs`` signs requests, pages lists and polls async jobs (``queryAsyncJobResult``); this module adds
the calls the OMA needs with CloudStack's quirks handled once (``listall`` for admin lists, ``{}`` for
empty lists, job results unwrapped) and maps failures to domain errors that say what CloudStack said:
unreachable → UNAVAILABLE, refused credentials → FAILED_PRECONDITION, parameter errors (431) →
INVALID_ARGUMENT, resource errors (530) → FAILED_PRECONDITION, job timeout → DEADLINE_EXCEEDED.
Secret keys never appear in messages.

CloudStack answers in JSON; this module turns each answer into a frozen dataclass with only the fields
the OMA reads (:class:`Zone`, :class:`Network`, :class:`ServiceOffering`, :class:`DiskOffering`,
:class:`Template`, :class:`VirtualMachine`, :class:`Volume`, :class:`Snapshot`, :class:`Account`), so
CloudStack's key names (``cpunumber``, ``virtualmachineid`` …) are spelled here and nowhere else.
Async calls (create/attach/detach/resize a volume, deploy/start/stop a VM, snapshots) return the job's
result as the same dataclasses.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TypeVar

import requests
from cs import CloudStack as _CsClient
from cs import CloudStackApiException, CloudStackException
from urllib3.exceptions import LocationValueError

from oma_server.domain.text_rules import quote
from oma_server.errors import DeadlineExceeded, DomainError, InvalidArgument, Unavailable

log = logging.getLogger("oma_server.cloudstack")
T = TypeVar("T")


class CloudStackError(DomainError):
    """CloudStack answered with an error; ``cs_code`` is CloudStack's error code (401, 431, 530 …)."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, cs_code: int = 0, code: str | None = None):
        super().__init__(message)
        self.cs_code = cs_code
        if code:
            self.code = code


@dataclass(frozen=True)
class Endpoint:
    api_url: str
    api_key: str
    secret_key: str
    verify_tls: bool = True

    def __repr__(self) -> str:  # keep the keys out of logs
        return f"Endpoint({self.api_url!r})"



# --- what CloudStack answers, typed ---------------------------------------------------------------------
def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return "" if value is None else str(value)


def _int(data: Mapping[str, Any], key: str) -> int:
    try:
        return int(data.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def _time(data: Mapping[str, Any], key: str) -> datetime | None:
    """CloudStack's timestamps (``2024-01-01T10:00:00+0000``) as naive UTC, the database's convention."""
    try:
        parsed = datetime.strptime(_text(data, key), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None
    return parsed.astimezone(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Zone:
    id: str
    name: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Zone":
        return cls(id=_text(data, "id"), name=_text(data, "name"))

    def matches(self, ref: str) -> bool:
        """A configuration may name its zone by id or by name (older ones stored names)."""
        return ref in (self.id, self.name)


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    display_text: str
    zone_id: str
    zone_name: str
    state: str
    network_type: str
    is_default: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Network":
        return cls(id=_text(data, "id"), name=_text(data, "name"), display_text=_text(data, "displaytext"),
                   zone_id=_text(data, "zoneid"), zone_name=_text(data, "zonename"), state=_text(data, "state"),
                   network_type=_text(data, "type"), is_default=bool(data.get("isdefault")))


@dataclass(frozen=True)
class ServiceOffering:
    id: str
    name: str
    display_text: str
    cpu_number: int
    cpu_speed_mhz: int
    memory_mb: int
    is_customized: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ServiceOffering":
        return cls(id=_text(data, "id"), name=_text(data, "name"), display_text=_text(data, "displaytext"),
                   cpu_number=_int(data, "cpunumber"), cpu_speed_mhz=_int(data, "cpuspeed"),
                   memory_mb=_int(data, "memory"), is_customized=bool(data.get("iscustomized")))


@dataclass(frozen=True)
class DiskOffering:
    id: str
    name: str
    display_text: str
    disk_size_gb: int
    is_customized: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DiskOffering":
        return cls(id=_text(data, "id"), name=_text(data, "name"), display_text=_text(data, "displaytext"),
                   disk_size_gb=_int(data, "disksize"), is_customized=bool(data.get("iscustomized")))


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    display_text: str
    os_type_name: str
    size_bytes: int
    is_ready: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Template":
        return cls(id=_text(data, "id"), name=_text(data, "name"), display_text=_text(data, "displaytext"),
                   os_type_name=_text(data, "ostypename"), size_bytes=_int(data, "size"),
                   is_ready=bool(data.get("isready")))


@dataclass(frozen=True)
class Nic:
    network_id: str
    ip_address: str
    mac_address: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Nic":
        return cls(network_id=_text(data, "networkid"), ip_address=_text(data, "ipaddress"),
                   mac_address=_text(data, "macaddress"))


@dataclass(frozen=True)
class VirtualMachine:
    id: str
    name: str
    display_name: str
    state: str
    account: str
    cpu_number: int
    memory_mb: int
    created: datetime | None  # naive UTC; None when CloudStack gave none or an unreadable one
    nics: tuple[Nic, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VirtualMachine":
        return cls(id=_text(data, "id"), name=_text(data, "name"), display_name=_text(data, "displayname"),
                   state=_text(data, "state"), account=_text(data, "account"), cpu_number=_int(data, "cpunumber"),
                   memory_mb=_int(data, "memory"), created=_time(data, "created"),
                   nics=tuple(Nic.from_json(n) for n in data.get("nic") or () if isinstance(n, Mapping)))


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    type: str  # ROOT | DATADISK
    size_bytes: int
    virtual_machine_id: str | None  # None: detached
    device_id: int | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Volume":
        device = data.get("deviceid")
        return cls(id=_text(data, "id"), name=_text(data, "name"), type=_text(data, "type"),
                   size_bytes=_int(data, "size"), virtual_machine_id=_text(data, "virtualmachineid") or None,
                   device_id=None if device is None or device == "" else int(device))


@dataclass(frozen=True)
class Snapshot:
    id: str
    state: str
    volume_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Snapshot":
        return cls(id=_text(data, "id"), state=_text(data, "state"), volume_id=_text(data, "volumeid"))


@dataclass(frozen=True)
class Account:
    name: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Account":
        return cls(name=_text(data, "name"))


def normalise_api_url(url: str) -> str:
    """Fix common typos: missing scheme, ``https//``, missing ``/client/api``."""
    url = url.strip()
    for broken, fixed in (("https//", "https://"), ("http//", "http://")):
        if url.startswith(broken):
            url = fixed + url[len(broken):]
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    url = url.rstrip("/")
    if not url.endswith("/client/api"):
        url += "/client/api"
    return url


def _error_fields(exc: CloudStackApiException) -> tuple[int, str]:
    error = exc.error if isinstance(exc.error, dict) else {}
    code = int(error.get("errorcode") or getattr(exc.response, "status_code", 0) or 0)
    return code, str(error.get("errortext") or exc)


def translate_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapped(self: "CloudStack", *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except CloudStackApiException as exc:
            code, text = _error_fields(exc)
            if code == 401:
                raise CloudStackError(
                    f"CloudStack at {self.endpoint.api_url} refused the API key or signature: {text}", code
                ) from None
            if code == 431:
                raise CloudStackError(f"CloudStack rejected the request: {text}", code, "INVALID_ARGUMENT") from None
            raise CloudStackError(f"CloudStack failed ({code}): {text}", code) from None
        except CloudStackException as exc:
            if "Timeout waiting for async job" in str(exc):
                raise DeadlineExceeded(f"CloudStack did not finish the job in time ({exc})") from None
            raise CloudStackError(f"unexpected answer from CloudStack at {self.endpoint.api_url}: {exc}") from None
        except LocationValueError:  # an address that passed no input check (e.g. a row older than the checks)
            raise InvalidArgument(f"the CloudStack API URL {quote(self.endpoint.api_url)} cannot be parsed") from None
        except requests.exceptions.Timeout:
            raise Unavailable(f"CloudStack at {self.endpoint.api_url} did not answer in time") from None
        except requests.exceptions.RequestException as exc:
            raise Unavailable(f"CloudStack at {self.endpoint.api_url} is unreachable: {type(exc).__name__}") from None

    return wrapped


def _items(response: Any, key: str) -> list[dict[str, Any]]:
    return list(response.get(key, [])) if isinstance(response, dict) else list(response or [])


class CloudStack:
    """Calls against one CloudStack endpoint (built per operation from the active configuration)."""

    def __init__(self, endpoint: Endpoint, *, poll_interval: float = 2.0, job_timeout: float = 300.0,
                 timeout: float = 30.0):
        if not endpoint.api_url.startswith(("http://", "https://")):
            raise InvalidArgument("the CloudStack API URL must start with http:// or https://")
        self.endpoint = endpoint
        # POST: the signed parameters (API key included) travel in the body, so HTTP-level debug
        # logging (urllib3 logs request lines) never shows them.
        self._cs = _CsClient(
            endpoint.api_url, endpoint.api_key, endpoint.secret_key, timeout=int(timeout), method="post",
            poll_interval=poll_interval, job_timeout=int(job_timeout), verify=endpoint.verify_tls,
            retry=2, fetch_result=True,
        )

    # --- lookups ------------------------------------------------------------------------------
    @translate_errors
    def list_zones(self) -> list[Zone]:
        return [Zone.from_json(z) for z in _items(self._cs.listZones(fetch_list=True), "zone")]

    @translate_errors
    def list_networks(self, zone_id: str = "") -> list[Network]:
        params = {"listall": True, **({"zoneid": zone_id} if zone_id else {})}
        return [Network.from_json(n) for n in _items(self._cs.listNetworks(fetch_list=True, **params), "network")]

    @translate_errors
    def list_service_offerings(self) -> list[ServiceOffering]:
        return [ServiceOffering.from_json(o)
                for o in _items(self._cs.listServiceOfferings(fetch_list=True), "serviceoffering")]

    @translate_errors
    def list_disk_offerings(self) -> list[DiskOffering]:
        return [DiskOffering.from_json(o) for o in _items(self._cs.listDiskOfferings(fetch_list=True), "diskoffering")]

    @translate_errors
    def list_templates(self, template_filter: str = "executable") -> list[Template]:
        seen: dict[str, Template] = {}
        for t in _items(self._cs.listTemplates(fetch_list=True, templatefilter=template_filter), "template"):
            template = Template.from_json(t)
            seen.setdefault(template.id, template)  # CloudStack lists a template once per zone
        return list(seen.values())

    @translate_errors
    def list_virtual_machines(self, **filters: Any) -> list[VirtualMachine]:
        return [VirtualMachine.from_json(vm) for vm in
                _items(self._cs.listVirtualMachines(fetch_list=True, listall=True, **filters), "virtualmachine")]

    @translate_errors
    def list_accounts(self) -> list[Account]:
        return [Account.from_json(a) for a in _items(self._cs.listAccounts(fetch_list=True), "account")]

    @translate_errors
    def list_volumes(self, **filters: Any) -> list[Volume]:
        return [Volume.from_json(v) for v in _items(self._cs.listVolumes(fetch_list=True, listall=True, **filters), "volume")]

    def get_volume(self, volume_id: str) -> Volume | None:
        try:
            found = self.list_volumes(id=volume_id)
        except CloudStackError as exc:
            if exc.cs_code == 431:
                return None
            raise
        return found[0] if found else None

    def get_virtual_machine(self, vm_id: str) -> VirtualMachine | None:
        try:
            found = self.list_virtual_machines(id=vm_id)
        except CloudStackError as exc:
            if exc.cs_code == 431:
                return None
            raise
        return found[0] if found else None

    def network_name(self, network_id: str) -> str | None:
        for network in self.list_networks():
            if network.id == network_id:
                return network.name or network_id
        return None

    def find_zone(self, ref: str) -> Zone | None:
        """The zone whose id or name is ``ref``."""
        return next((z for z in self.list_zones() if z.matches(ref)), None)

    def find_service_offering(self, offering_id: str) -> ServiceOffering | None:
        return next((o for o in self.list_service_offerings() if o.id == offering_id), None)

    # --- volumes -----------------------------------------------------------------------------
    @translate_errors
    def create_volume(self, *, name: str, zone_id: str, disk_offering_id: str, size_gb: int) -> Volume:
        result = self._cs.createVolume(name=name, zoneid=zone_id, diskofferingid=disk_offering_id, size=size_gb)
        return Volume.from_json(result["volume"])

    @translate_errors
    def attach_volume(self, volume_id: str, vm_id: str, device_id: int | None = None) -> Volume:
        params = {"id": volume_id, "virtualmachineid": vm_id}
        if device_id is not None:
            params["deviceid"] = device_id
        return Volume.from_json(self._cs.attachVolume(**params)["volume"])

    @translate_errors
    def detach_volume(self, volume_id: str) -> Volume:
        return Volume.from_json(self._cs.detachVolume(id=volume_id)["volume"])

    @translate_errors
    def delete_volume(self, volume_id: str) -> None:
        self._cs.deleteVolume(id=volume_id)

    @translate_errors
    def resize_volume(self, volume_id: str, size_gb: int, disk_offering_id: str = "") -> Volume:
        params: dict[str, Any] = {"id": volume_id, "size": size_gb}
        if disk_offering_id:
            params["diskofferingid"] = disk_offering_id
        return Volume.from_json(self._cs.resizeVolume(**params)["volume"])

    # --- virtual machines ------------------------------------------------------------------------
    @translate_errors
    def deploy_virtual_machine(self, *, name: str, display_name: str, zone_id: str, service_offering_id: str,
                               template_id: str, network_ids: list[str], details: dict[str, Any] | None = None,
                               start: bool = False) -> VirtualMachine:
        """deployVirtualMachine (one NIC per network, in order); ``startvm=false`` by default."""
        params: dict[str, Any] = {
            "name": name, "displayname": display_name, "zoneid": zone_id, "serviceofferingid": service_offering_id,
            "templateid": template_id, "networkids": ",".join(network_ids), "startvm": start,
        }
        if details:
            params["details"] = {k: str(v) for k, v in details.items()}
        return VirtualMachine.from_json(self._cs.deployVirtualMachine(**params)["virtualmachine"])

    def find_virtual_machines(self, name: str) -> list[VirtualMachine]:
        """VMs whose name is exactly ``name`` (``listVirtualMachines name=`` matches substrings)."""
        return [vm for vm in self.list_virtual_machines(name=name) if vm.name == name]

    @translate_errors
    def start_virtual_machine(self, vm_id: str) -> VirtualMachine:
        return VirtualMachine.from_json(self._cs.startVirtualMachine(id=vm_id)["virtualmachine"])

    @translate_errors
    def stop_virtual_machine(self, vm_id: str, forced: bool = False) -> VirtualMachine:
        return VirtualMachine.from_json(self._cs.stopVirtualMachine(id=vm_id, forced=forced)["virtualmachine"])

    @translate_errors
    def destroy_virtual_machine(self, vm_id: str, expunge: bool = True) -> None:
        self._cs.destroyVirtualMachine(id=vm_id, expunge=expunge)

    # --- volume snapshots --------------------------------------------------------------------------
    @translate_errors
    def create_snapshot(self, volume_id: str, name: str) -> Snapshot:
        return Snapshot.from_json(self._cs.createSnapshot(volumeid=volume_id, name=name, quiescevm=False)["snapshot"])

    @translate_errors
    def revert_snapshot(self, snapshot_id: str) -> Snapshot:
        return Snapshot.from_json(self._cs.revertSnapshot(id=snapshot_id)["snapshot"])

    @translate_errors
    def delete_snapshot(self, snapshot_id: str) -> None:
        self._cs.deleteSnapshot(id=snapshot_id)

    @translate_errors
    def list_snapshots(self, **filters: Any) -> list[Snapshot]:
        return [Snapshot.from_json(s) for s in _items(self._cs.listSnapshots(fetch_list=True, listall=True, **filters), "snapshot")]

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        try:
            found = self.list_snapshots(id=snapshot_id)
        except CloudStackError as exc:
            if exc.cs_code == 431:
                return None
            raise
        return found[0] if found else None
