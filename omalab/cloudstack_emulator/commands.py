"""The CloudStack API commands the emulator implements.

Each handler runs under the state lock with a :class:`Ctx` (the parsed request).  Sync handlers return
the body of ``<command>response``.  Async handlers do what CloudStack does before queueing the job
(parameter translation; for ``BaseAsyncCreateCmd`` commands also the ``create()`` phase that allocates
the entity and validates most arguments) and return a :class:`Submit`; the rest of the validation and
the mutation run in the job.  Messages are CloudStack's where they come from code we checked
(ParamProcessWorker, ApiDispatcher, VolumeApiServiceImpl, SnapshotManagerImpl); a few rarer ones are
close paraphrases.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import (
    ApiError,
    bad_uuid,
    bad_value,
    invalid,
    missing_param,
    permission_denied,
    runtime_error,
    server_error,
)
from .state import (
    MAX_DATA_VOLUMES,
    MAX_DEVICE_ID,
    REMOVED,
    Account,
    GiB,
    Snapshot,
    State,
    User,
    VirtualMachine,
    new_uuid,
    now_str,
)
from .storage import restore_into, sparse_copy

__all__ = ["COMMANDS", "CommandSpec", "Ctx", "Submit"]

DEFAULT_PAGE_SIZE = 500
CUSTOM_DISK_MIN_GB = 1
CUSTOM_DISK_MAX_GB = 1024
_TEMPLATE_FILTERS = ("featured", "self", "selfexecutable", "sharedexecutable", "executable",
                     "community", "all")
_LONG_RE = re.compile(r"^[+-]?\d+$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass
class Submit:
    """What an async handler hands to the job runner."""

    work: Callable[[], dict]
    instance_id: str | None = None
    object_id: str | None = None  # BaseAsyncCreateCmd: the id returned next to the jobid
    on_fail: Callable[[], None] | None = None


@dataclass
class CommandSpec:
    name: str
    handler: Callable[[Ctx], object]
    is_async: bool
    creates: bool
    cmd_class: str
    instance_type: str | None


COMMANDS: dict[str, CommandSpec] = {}


def command(name: str, *, is_async: bool = False, creates: bool = False, cmd_class: str = "",
            instance_type: str | None = None):
    def register(fn):
        COMMANDS[name] = CommandSpec(name, fn, is_async, creates, cmd_class, instance_type)
        return fn
    return register


class Ctx:
    """One authenticated API call: its parameters, caller and helpers mirroring CloudStack's parsing."""

    def __init__(self, state: State, command: str, params: dict[str, str], user: User) -> None:
        self.state = state
        self.command = command
        self.params = params
        self.user = user
        self.account: Account = state.accounts[user.account_id]

    # -- parameter parsing (ParamProcessWorker) ---------------------------------------------------

    def str(self, name: str, *, required: bool = False, maxlen: int = 255) -> str | None:
        value = self.params.get(name)
        if value is None:
            if required:
                raise missing_param(self.command, name)
            return None
        if len(value) > maxlen:
            raise server_error(431, f"Unable to execute API command {self.command.lower()} due to "
                                    f"invalid value. Value greater than max allowed length {maxlen} "
                                    f"for param: {name}")
        return value

    def long(self, name: str, *, required: bool = False) -> int | None:
        value = self.str(name, required=required)
        if value is None or value.strip() == "":
            return None
        if not _LONG_RE.match(value):
            raise bad_value(self.command, name, value)
        return int(value)

    def bool(self, name: str, default: bool | None = None) -> bool | None:
        value = self.params.get(name)
        if value is None:
            return default
        return value.lower() == "true"  # Boolean.valueOf

    def entity(self, name: str, kind: str, *, required: bool = False):
        value = self.str(name, required=required)
        if value is None:
            return None
        found = self.state.lookup(kind, value)
        if found is None:
            raise bad_uuid(self.command, name, value)
        return found

    def entities(self, name: str, kind: str) -> list:
        value = self.str(name, maxlen=1 << 16)
        if value is None:
            return []
        out = []
        for token in value.split(","):
            if not token:
                continue
            found = self.state.lookup(kind, token)
            if found is None:
                raise bad_uuid(self.command, name, token)
            out.append(found)
        return out

    def map(self, name: str) -> dict[str, str]:
        """A map parameter (``details[0].cpuNumber=2``), all indexes merged."""
        merged: dict[str, str] = {}
        pattern = re.compile(rf"^{re.escape(name)}\[(\d+)\]\.(.+)$")
        for key in sorted(self.params):
            m = pattern.match(key)
            if m:
                merged[m.group(2)] = self.params[key]
        return merged

    # -- access ------------------------------------------------------------------------------------

    def owner(self) -> Account:
        """The owner of a new resource: ``account``+``domainid`` for admins, else the caller."""
        name = self.params.get("account")
        if name and self.account.is_admin:
            for acct in self.state.accounts.values():
                if acct.name == name:
                    return acct
            raise invalid(f"Unable to find account {name} in domain {self.params.get('domainid')}")
        return self.account

    def check_access(self, obj) -> None:
        if obj is None or obj is REMOVED:
            return
        owner = getattr(obj, "account_id", None)
        if owner is None or self.account.is_admin or owner == self.account.id:
            return
        raise permission_denied(f"Account {self.account.name} does not have permission to operate "
                                f"with resource {obj.id}")

    def listable(self, owner_id: str | None, *, by_id: bool) -> bool:
        """CloudStack's list scoping: users see their own; admins their own unless listall/id/account."""
        if owner_id is None:
            return True
        if not self.account.is_admin:
            return owner_id == self.account.id
        if self.bool("listall", False) or by_id or "domainid" in self.params:
            return True
        name = self.params.get("account")
        if name is not None:
            owner = self.state.accounts.get(owner_id)
            return owner is not None and owner.name == name
        return owner_id == self.account.id

    # -- lists (BaseListCmd) -----------------------------------------------------------------------

    def paging(self) -> tuple[int, int | None]:
        page = self.long("page")
        size = self.long("pagesize")
        if page is None and size is not None and size != -1:
            raise server_error(431, '"page" parameter is required when "pagesize" is specified')
        if size is None and page is not None:
            raise server_error(431, '"pagesize" parameter is required when "page" is specified')
        if size is not None and size > DEFAULT_PAGE_SIZE:
            raise invalid(f"Page size can't exceed max allowed page size value: {DEFAULT_PAGE_SIZE}")
        if size == -1:
            if page is not None:
                raise invalid("Can't specify page parameter when pagesize is -1 (Unlimited)")
            return 0, None
        if page is not None and page <= 0:
            raise invalid(f"Invalid page number: {page}. Page numbers must be positive integers.")
        size = DEFAULT_PAGE_SIZE if size is None else size
        return ((page or 1) - 1) * size, size

    def page(self, items: list[dict], key: str) -> dict:
        start, size = self.paging()
        if not items:
            return {}
        chosen = items[start:] if size is None else items[start:start + size]
        out: dict = {"count": len(items)}
        if chosen:
            out[key] = chosen
        return out


def _ci(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def _like(needle: str | None, *haystacks: str | None) -> bool:
    if needle is None:
        return True
    n = needle.casefold()
    return any(h is not None and n in h.casefold() for h in haystacks)


def _by_id(ctx: Ctx, name: str, kind: str):
    """(filter object, filtered) for an id filter on a list command."""
    found = ctx.entity(name, kind)
    return found, found is not None


# ===================================================================================== lists


@command("listZones")
def list_zones(ctx: Ctx) -> dict:
    ctx.paging()
    zone, by_id = _by_id(ctx, "id", "zone")
    name, keyword = ctx.str("name"), ctx.str("keyword")
    items = [
        ctx.state.render_zone(z) for z in ctx.state.zones.values()
        if (not by_id or z is zone) and (name is None or _ci(z.name, name))
        and _like(keyword, z.name, z.description)
    ]
    return ctx.page(items, "zone")


@command("listDiskOfferings")
def list_disk_offerings(ctx: Ctx) -> dict:
    ctx.paging()
    off, by_id = _by_id(ctx, "id", "diskoffering")
    ctx.entity("zoneid", "zone")
    name, keyword = ctx.str("name"), ctx.str("keyword")
    items = [
        ctx.state.render_disk_offering(o) for o in ctx.state.disk_offerings.values()
        if (not by_id or o is off) and (name is None or _ci(o.name, name))
        and _like(keyword, o.name, o.displaytext)
    ]
    return ctx.page(items, "diskoffering")


@command("listServiceOfferings")
def list_service_offerings(ctx: Ctx) -> dict:
    ctx.paging()
    off, by_id = _by_id(ctx, "id", "serviceoffering")
    ctx.entity("zoneid", "zone")
    if ctx.bool("issystem", False):
        return ctx.page([], "serviceoffering")
    name, keyword = ctx.str("name"), ctx.str("keyword")
    items = [
        ctx.state.render_service_offering(o) for o in ctx.state.service_offerings.values()
        if (not by_id or o is off) and (name is None or _ci(o.name, name))
        and _like(keyword, o.name, o.displaytext)
    ]
    return ctx.page(items, "serviceoffering")


@command("listTemplates")
def list_templates(ctx: Ctx) -> dict:
    ctx.paging()
    tfilter = ctx.str("templatefilter", required=True)
    if tfilter not in _TEMPLATE_FILTERS:
        raise server_error(431, "No enum constant "
                                f"com.cloud.template.VirtualMachineTemplate.TemplateFilter.{tfilter}")
    tpl, by_id = _by_id(ctx, "id", "template")
    zone = ctx.entity("zoneid", "zone")
    name, keyword = ctx.str("name"), ctx.str("keyword")
    caller = ctx.account
    account_specific = caller.is_admin and "account" in ctx.params and "domainid" in ctx.params
    only_ready = tfilter in ("featured", "selfexecutable", "sharedexecutable", "community") or (
        tfilter == "executable" and account_specific)
    if tfilter == "all" and not caller.is_admin:
        tfilter = "executable"

    def visible(t) -> bool:
        own = t.account_id == caller.id
        if tfilter == "featured":
            return t.isfeatured
        if tfilter in ("self", "selfexecutable"):
            return own
        if tfilter == "sharedexecutable":
            return False
        if tfilter == "community":
            return t.ispublic and not t.isfeatured
        if tfilter == "executable":
            return own or t.ispublic or t.isfeatured
        return True  # all (admin)

    items = []
    for t in ctx.state.templates.values():
        if by_id and t is not tpl:
            continue
        if not visible(t) or (only_ready and not t.isready):
            continue
        if name is not None and not _ci(t.name, name):
            continue
        if not _like(keyword, t.name, t.displaytext):
            continue
        for zid in t.zone_ids:  # one entry per zone the template is in, like CloudStack
            if zone is None or zone is REMOVED or zone.id == zid:
                items.append(ctx.state.render_template(t, zid))
    return ctx.page(items, "template")


@command("listNetworks")
def list_networks(ctx: Ctx) -> dict:
    ctx.paging()
    net, by_id = _by_id(ctx, "id", "network")
    zone = ctx.entity("zoneid", "zone")
    ntype, keyword, name = ctx.str("type"), ctx.str("keyword"), ctx.str("name")
    items = [
        ctx.state.render_network(n) for n in ctx.state.networks.values()
        if (not by_id or n is net) and (zone is None or zone is not REMOVED and n.zone_id == zone.id)
        and (ntype is None or _ci(n.type, ntype)) and (name is None or _ci(n.name, name))
        and _like(keyword, n.name, n.displaytext) and ctx.listable(n.account_id, by_id=by_id)
    ]
    return ctx.page(items, "network")


@command("listAccounts")
def list_accounts(ctx: Ctx) -> dict:
    ctx.paging()
    acct, by_id = _by_id(ctx, "id", "account")
    ctx.entity("domainid", "domain")
    name, keyword = ctx.str("name"), ctx.str("keyword")
    caller = ctx.account
    if by_id and acct is not REMOVED and not caller.is_admin and acct.id != caller.id:
        raise permission_denied(f"Account {caller.name} does not have permission to operate with "
                                f"resource {acct.id}")
    list_all = caller.is_admin and (ctx.bool("listall", False) or "domainid" in ctx.params)
    items = []
    for a in ctx.state.accounts.values():
        if by_id:
            if a is not acct:
                continue
        elif not list_all and a.id != caller.id:  # even admins search only their own account
            continue
        if name is not None and a.name != name:
            continue
        if not _like(keyword, a.name, a.state):
            continue
        items.append(ctx.state.render_account(a))
    return ctx.page(items, "account")


def _vm_visible_state(ctx: Ctx, vm: VirtualMachine, state_filter: str | None) -> bool:
    if state_filter is None:
        if vm.state == "Expunging":
            return False
        return vm.state != "Destroyed" or ctx.account.is_admin
    if _ci(state_filter, "present"):
        return vm.state not in ("Destroyed", "Expunging")
    return _ci(vm.state, state_filter)


@command("listVirtualMachines")
def list_virtual_machines(ctx: Ctx) -> dict:
    ctx.paging()
    vm_filter, by_id = _by_id(ctx, "id", "vm")
    zone = ctx.entity("zoneid", "zone")
    net = ctx.entity("networkid", "network")
    tpl = ctx.entity("templateid", "template")
    name, keyword, state = ctx.str("name"), ctx.str("keyword"), ctx.str("state")
    items = []
    for vm in ctx.state.vms.values():
        if by_id and vm is not vm_filter:
            continue
        if not ctx.listable(vm.account_id, by_id=by_id):
            continue
        if not _vm_visible_state(ctx, vm, state):
            continue
        if zone is not None and (zone is REMOVED or vm.zone_id != zone.id):
            continue
        if net is not None and (net is REMOVED or all(n.network_id != net.id for n in vm.nics)):
            continue
        if tpl is not None and (tpl is REMOVED or vm.template_id != tpl.id):
            continue
        if not _like(name, vm.name):  # a substring match, as CloudStack documents
            continue
        if keyword is not None:
            acct = ctx.state.accounts[vm.account_id]
            instance = f"i-{acct.internal_id}-{vm.internal_id}-VM"
            if not (_like(keyword, vm.displayname, vm.name, instance) or _ci(vm.state, keyword)):
                continue
        items.append(ctx.state.render_vm(vm))
    return ctx.page(items, "virtualmachine")


@command("listVolumes")
def list_volumes(ctx: Ctx) -> dict:
    ctx.paging()
    vol_filter, by_id = _by_id(ctx, "id", "volume")
    vm = ctx.entity("virtualmachineid", "vm")
    zone = ctx.entity("zoneid", "zone")
    vtype, name, keyword, state = (ctx.str("type"), ctx.str("name"), ctx.str("keyword"),
                                   ctx.str("state"))
    items = []
    for vol in ctx.state.volumes.values():
        if by_id and vol is not vol_filter:
            continue
        if not ctx.listable(vol.account_id, by_id=by_id or vm is not None):
            continue
        if vm is not None and (vm is REMOVED or vol.vm_id != vm.id):
            continue
        if zone is not None and (zone is REMOVED or vol.zone_id != zone.id):
            continue
        if vtype is not None and not _ci(vol.type, vtype):
            continue
        if state is not None and not _ci(vol.state, state):
            continue
        if not _like(name, vol.name) or not _like(keyword, vol.name):
            continue
        items.append(ctx.state.render_volume(vol))
    return ctx.page(items, "volume")


@command("listSnapshots")
def list_snapshots(ctx: Ctx) -> dict:
    ctx.paging()
    snap_filter, by_id = _by_id(ctx, "id", "snapshot")
    vol = ctx.entity("volumeid", "volume")
    zone = ctx.entity("zoneid", "zone")
    name, keyword, stype = ctx.str("name"), ctx.str("keyword"), ctx.str("snapshottype")
    items = []
    for snap in ctx.state.snapshots.values():
        if by_id and snap is not snap_filter:
            continue
        if not ctx.listable(snap.account_id, by_id=by_id):
            continue
        if vol is not None and (vol is REMOVED or snap.volume_id != vol.id):
            continue
        if zone is not None and (zone is REMOVED or snap.zone_id != zone.id):
            continue
        if stype is not None and not _ci(stype, "MANUAL"):
            continue
        if not _like(name, snap.name) or not _like(keyword, snap.name):
            continue
        items.append(ctx.state.render_snapshot(snap))
    return ctx.page(items, "snapshot")


@command("queryAsyncJobResult")
def query_async_job_result(ctx: Ctx) -> dict:
    job = ctx.entity("jobid", "job", required=True)
    if not ctx.account.is_admin and job.account_id != ctx.account.id:
        raise permission_denied(f"Account {ctx.account.name} does not have permission to access "
                                f"job {job.id}")
    return ctx.state.render_job(job)


# ===================================================================================== volumes

_VOLUME_CMD = "org.apache.cloudstack.api.command.user.volume."


def _gone(kind: str, value) -> ApiError:
    return invalid(f"Unable to find {kind} with ID: {value}")


@command("createVolume", is_async=True, creates=True, cmd_class=_VOLUME_CMD + "CreateVolumeCmd",
         instance_type="Volume")
def create_volume(ctx: Ctx) -> Submit:
    st = ctx.state
    name = ctx.str("name")
    zone = ctx.entity("zoneid", "zone")
    offering = ctx.entity("diskofferingid", "diskoffering")
    size_gb = ctx.long("size")
    vm = ctx.entity("virtualmachineid", "vm")
    if ctx.str("snapshotid") is not None:
        raise invalid("Creating a volume from a snapshot is not supported by this emulator")
    owner = ctx.owner()
    ctx.check_access(vm)
    if size_gb is not None and size_gb <= 0:
        raise invalid("Disk size must be larger than 0")
    if offering is None or offering is REMOVED:
        raise invalid("Missing parameter(s),either a positive volume size or a valid disk offering "
                      "id must be specified.")
    if offering.iscustomized:
        if size_gb is None:
            raise invalid("This disk offering requires a custom size specified")
        if not CUSTOM_DISK_MIN_GB <= size_gb <= CUSTOM_DISK_MAX_GB:
            raise invalid(f"Volume size: {size_gb}GB is out of allowed range. Max: "
                          f"{CUSTOM_DISK_MAX_GB} Min:{CUSTOM_DISK_MIN_GB}")
    elif size_gb is not None:
        raise invalid("This disk offering does not allow custom size")
    if zone is None and vm not in (None, REMOVED):
        zone = st.zones[vm.zone_id]
    if zone is None or zone is REMOVED:
        raise invalid("Please specify a valid zone.")
    size = (size_gb if offering.iscustomized else offering.disksize_gb) * GiB
    vol = st.add_volume(name or new_uuid(), owner, zone, "DATADISK", size, "Allocated",
                        disk_offering_id=offering.id)

    def work() -> dict:
        if vol.id not in st.volumes:
            raise runtime_error(f"Failed to create volume {vol.name}: it was deleted")
        if vm is not None:
            _attach(st, vol, vm, None)
        return {"volume": st.render_volume(vol)}

    return Submit(work, instance_id=vol.id, object_id=vol.id)


def _attach(st: State, vol, vm, device_id: int | None) -> None:
    """VolumeApiServiceImpl.attachVolumeToVM + getDeviceId, for KVM."""
    if vol is REMOVED or vol is None or vol.type not in ("ROOT", "DATADISK"):
        raise invalid("Please specify a volume with the valid type: ROOT or DATADISK")
    if vol.vm_id is not None:
        raise invalid("Please specify a volume that is not attached to any VM.")
    if vol.state == "Destroy":
        raise invalid("Please specify a volume that is not destroyed.")
    if vm is REMOVED or vm is None or vm.state in ("Destroyed", "Expunging"):
        raise invalid("Please specify a valid User VM.")
    if vm.state not in ("Running", "Stopped"):
        raise invalid("Please specify a VM that is either running or stopped.")
    if vm.zone_id != vol.zone_id:
        raise invalid("Please specify a VM that is in the same zone as the volume.")
    attached = st.vm_volumes(vm.id)
    if device_id == 0:
        if vm.state != "Stopped":
            raise invalid("Root volume detach can happen only when vm is in states: Stopped or "
                          "Destroyed")
        if any(v.device_id == 0 for v in attached):
            raise invalid("Vm already has root volume attached to it")
    else:
        if sum(v.type == "DATADISK" for v in attached) >= MAX_DATA_VOLUMES:
            raise invalid(f"The specified VM already has the maximum number of data disks "
                          f"({MAX_DATA_VOLUMES}) attached. Please specify another VM.")
    used = {v.device_id for v in attached}
    if device_id is not None:
        if device_id < 0 or device_id > MAX_DEVICE_ID or device_id == 3:
            raise runtime_error(f"deviceId should be 1,2,4-{MAX_DEVICE_ID}")
        if device_id in used:
            raise runtime_error(f"deviceId {device_id} is used by vm {vm.id}")
    else:
        free = [i for i in range(1, MAX_DEVICE_ID + 1) if i != 3 and i not in used]
        if not free:
            raise runtime_error(f"All device Ids are used by vm {vm.id}")
        device_id = free[0]
    vol.vm_id, vol.device_id, vol.attached = vm.id, device_id, now_str()
    if device_id == 0:
        vol.type = "ROOT"
    root = next((v for v in attached if v.device_id == 0), None)
    if vol.state == "Allocated" and (vm.state == "Running" or (root and root.state == "Ready")):
        vol.state = "Ready"  # created on the VM's primary storage when attached


def _detach(st: State, vol) -> None:
    vm = st.vms.get(vol.vm_id or "")
    if vm is None:
        raise invalid("The specified volume is not attached to a VM.")
    if vm.state not in ("Running", "Stopped", "Destroyed"):
        raise invalid("Please specify a VM that is either running or stopped.")
    if vol.type == "ROOT" and vm.state not in ("Stopped", "Destroyed"):
        raise invalid("Root volume detach can happen only when vm is in states: Stopped or "
                      "Destroyed")
    vol.vm_id, vol.device_id, vol.attached = None, None, None
    if vol.type == "ROOT":
        vol.type = "DATADISK"  # VolumeDaoImpl.detachVolume


@command("attachVolume", is_async=True, cmd_class=_VOLUME_CMD + "AttachVolumeCmd",
         instance_type="Volume")
def attach_volume(ctx: Ctx) -> Submit:
    vol = ctx.entity("id", "volume", required=True)
    vm = ctx.entity("virtualmachineid", "vm", required=True)
    device_id = ctx.long("deviceid")
    ctx.check_access(vol)
    ctx.check_access(vm)

    def work() -> dict:
        _attach(ctx.state, vol if vol is REMOVED or vol.id in ctx.state.volumes else REMOVED,
                vm if vm is REMOVED or vm.id in ctx.state.vms else REMOVED, device_id)
        return {"volume": ctx.state.render_volume(vol)}

    return Submit(work, instance_id=None if vol is REMOVED else vol.id)


@command("detachVolume", is_async=True, cmd_class=_VOLUME_CMD + "DetachVolumeCmd",
         instance_type="Volume")
def detach_volume(ctx: Ctx) -> Submit:
    st = ctx.state
    vol = ctx.entity("id", "volume")
    vm = ctx.entity("virtualmachineid", "vm")
    device_id = ctx.long("deviceid")
    ctx.check_access(vol)

    def work() -> dict:
        target = vol
        if (vol is None and (device_id is None or vm is None)) or (
                vol is not None and (device_id is not None or vm is not None)):
            raise invalid("Please provide either a volume id, or a tuple(device id, instance id)")
        if target is None:
            target = next((v for v in st.volumes.values()
                           if vm is not REMOVED and v.vm_id == vm.id and v.device_id == device_id),
                          None)
            if target is None:
                raise runtime_error("Index: 0, Size: 0")  # what CloudStack's .get(0) throws
        if target is REMOVED or target.id not in st.volumes:
            raise _gone("volume", ctx.params.get("id"))
        _detach(st, target)
        return {"volume": st.render_volume(target)}

    return Submit(work, instance_id=vol.id if vol not in (None, REMOVED) else None)


@command("deleteVolume")
def delete_volume(ctx: Ctx) -> dict:
    st = ctx.state
    vol = ctx.entity("id", "volume", required=True)
    if vol is REMOVED:
        raise _gone("volume", ctx.params["id"])
    ctx.check_access(vol)
    if vol.vm_id is not None:
        raise invalid("Please specify a volume that is not attached to any VM.")
    st.remove("volume", vol.id)
    st.volume_file(vol.id).unlink(missing_ok=True)
    return {"success": True}


@command("resizeVolume", is_async=True, cmd_class=_VOLUME_CMD + "ResizeVolumeCmd",
         instance_type="Volume")
def resize_volume(ctx: Ctx) -> Submit:
    st = ctx.state
    vol = ctx.entity("id", "volume", required=True)
    size_gb = ctx.long("size")
    offering = ctx.entity("diskofferingid", "diskoffering")
    shrink_ok = ctx.bool("shrinkok", False)
    ctx.check_access(vol)

    def work() -> dict:
        if vol is REMOVED or vol.id not in st.volumes:
            raise _gone("volume", ctx.params["id"])
        if vol.state not in ("Ready", "Allocated"):
            raise invalid(f"Volume should be in ready or allocated state before attempting a resize. "
                          f"Volume {vol.id} is in state {vol.state}.")
        current = st.disk_offerings.get(vol.disk_offering_id or "")
        if offering is not None and offering is not REMOVED:
            if offering.iscustomized:
                if size_gb is None:
                    raise invalid("This disk offering requires a custom size specified")
                new_size = size_gb * GiB
            else:
                new_size = offering.disksize_gb * GiB
        else:
            if size_gb is None:
                raise invalid("No new size was specified for the volume")
            if vol.type != "ROOT" and not (current and current.iscustomized):
                raise invalid("To change a volume's size without providing a new disk offering, its "
                              "current disk offering must be customizable or it must be a root "
                              "volume (if providing a disk offering, make sure it is different from "
                              "the current disk offering).")
            new_size = size_gb * GiB
        if new_size <= 0:
            raise invalid("Disk size must be larger than 0")
        if new_size < vol.size and not shrink_ok:
            raise invalid(f"Going from existing size of {vol.size} to size of {new_size} would "
                          "shrink the volume.Need to sign off by supplying the shrinkok parameter "
                          "with value of true.")
        with open(st.volume_file(vol.id), "r+b") as f:
            f.truncate(new_size)
        vol.size = new_size
        if offering is not None and offering is not REMOVED:
            vol.disk_offering_id = offering.id
        return {"volume": st.render_volume(vol)}

    return Submit(work, instance_id=None if vol is REMOVED else vol.id)


# ===================================================================================== VMs

_VM_CMD = "org.apache.cloudstack.api.command.user.vm."


@command("deployVirtualMachine", is_async=True, creates=True, cmd_class=_VM_CMD + "DeployVMCmd",
         instance_type="VirtualMachine")
def deploy_virtual_machine(ctx: Ctx) -> Submit:
    st = ctx.state
    zone = ctx.entity("zoneid", "zone", required=True)
    offering = ctx.entity("serviceofferingid", "serviceoffering", required=True)
    template = ctx.entity("templateid", "template", required=True)
    networks = ctx.entities("networkids", "network")
    name = ctx.str("name")
    displayname = ctx.str("displayname")
    start = ctx.bool("startvm", True)
    root_gb = ctx.long("rootdisksize")
    disk_offering = ctx.entity("diskofferingid", "diskoffering")
    disk_size_gb = ctx.long("size")
    details = ctx.map("details")
    owner = ctx.owner()
    user = ctx.user if owner.id == ctx.account.id else next(
        u for u in st.users.values() if u.account_id == owner.id)

    if zone is REMOVED:
        raise invalid("Please specify a valid zone.")
    if offering is REMOVED:
        raise invalid("Unable to find service offering")
    if template is REMOVED or not template.isready or zone.id not in template.zone_ids:
        raise invalid(f"Template {ctx.params['templateid']} has not been completely downloaded to "
                      f"zone {zone.id}")
    if template.account_id != owner.id and not (template.ispublic or template.isfeatured) \
            and not ctx.account.is_admin:
        raise permission_denied(f"Account {owner.name} does not have permission to use template "
                                f"{template.id}")
    cpunumber = cpuspeed = memory = None
    if offering.iscustomized:
        try:
            cpunumber = int(details["cpuNumber"])
            memory = int(details["memory"])
            cpuspeed = int(details.get("cpuSpeed", "1000"))
        except (KeyError, ValueError):
            raise invalid("Need to specify custom parameter values cpu, cpu speed and memory when "
                          "using custom offering") from None
    if root_gb is None and "rootdisksize" in details:
        if not _LONG_RE.match(details["rootdisksize"]):
            raise bad_value(ctx.command, "details", details["rootdisksize"])
        root_gb = int(details["rootdisksize"])
    template_gb = math.ceil(template.size / GiB)
    if root_gb is not None:
        if root_gb <= 0:
            raise invalid(f"Root disk size should be a positive number: {root_gb}")
        if root_gb < template_gb:
            raise invalid(f"Root disk size of {root_gb} GB is smaller than the template size of "
                          f"{template_gb} GB")
    if not networks:
        raise invalid("No network specified: specify networkids to deploy a VM in an advanced zone")
    for net in networks:
        if net is REMOVED:
            raise invalid("Unable to find the network to deploy the VM in")
        if net.zone_id != zone.id:
            raise invalid(f"Network id={net.id} doesn't belong to zone {zone.id}")
        if net.account_id not in (None, owner.id):
            raise permission_denied(f"Account {owner.name} does not have permission to operate "
                                    f"with resource {net.id}")
    if len({n.id for n in networks}) != len(networks):
        raise invalid("Network is specified more than once")
    if disk_offering is not None:
        if disk_offering is REMOVED:
            raise invalid("Please specify a valid disk offering.")
        if disk_offering.iscustomized and disk_size_gb is None:
            raise invalid("This disk offering requires a custom size specified")
    hostname = name or ("VM-" + new_uuid())
    if name is not None and not _HOSTNAME_RE.match(name):
        raise invalid("Invalid name. Vm name can contain ASCII letters 'a' through 'z', the digits "
                      "'0' through '9', and the hyphen ('-'), must be between 1 and 63 characters "
                      "long, and can't start or end with \"-\" and can't start with digit")
    for other in st.vms.values():
        if other.account_id == owner.id and other.zone_id == zone.id and _ci(other.name, hostname) \
                and other.state not in ("Expunging",):
            raise invalid(f"The vm with hostName {hostname} already exists in the network domain: "
                          f"cs{owner.internal_id}cloud.internal; network="
                          f"{networks[0].name}")

    vm = st.add_vm(hostname, displayname or hostname, owner, user, zone, template, offering,
                   networks, "Starting" if start else "Stopped",
                   root_size=root_gb * GiB if root_gb is not None else None,
                   cpunumber=cpunumber, cpuspeed=cpuspeed, memory=memory,
                   details={k: v for k, v in details.items() if k in ("cpuNumber", "cpuSpeed",
                                                                      "memory")})
    for vol in st.vm_volumes(vm.id):
        vol.state = "Allocated"  # nothing on primary storage until the first start
    if disk_offering is not None:
        size = (disk_size_gb if disk_offering.iscustomized else disk_offering.disksize_gb) * GiB
        data = st.add_volume(f"DATA-{vm.internal_id}", owner, zone, "DATADISK", size, "Allocated",
                             disk_offering_id=disk_offering.id)
        data.vm_id, data.device_id, data.attached = vm.id, 1, now_str()

    def work() -> dict:
        if vm.id not in st.vms:
            raise runtime_error(f"Unable to deploy VM {vm.name}: it was removed")
        if start:
            _power_on(st, vm)
        return {"virtualmachine": st.render_vm(vm)}

    def on_fail() -> None:
        if vm.id in st.vms:
            vm.state = "Error"

    return Submit(work, instance_id=vm.id, object_id=vm.id, on_fail=on_fail)


def _power_on(st: State, vm: VirtualMachine) -> None:
    vols = st.vm_volumes(vm.id)
    if not any(v.device_id == 0 for v in vols):
        raise runtime_error(f"Unable to start VM {vm.name} ({vm.id}): it has no ROOT volume")
    vm.state = "Running"
    for vol in vols:
        if vol.state == "Allocated":
            vol.state = "Ready"
    for nic in vm.nics:
        net = st.networks.get(nic.network_id)
        if net is not None and net.state == "Allocated":
            net.state = "Implemented"


def _vm_for_action(ctx: Ctx) -> VirtualMachine:
    vm = ctx.entity("id", "vm", required=True)
    ctx.check_access(vm)
    return vm


@command("startVirtualMachine", is_async=True, cmd_class=_VM_CMD + "StartVMCmd",
         instance_type="VirtualMachine")
def start_virtual_machine(ctx: Ctx) -> Submit:
    st = ctx.state
    vm = _vm_for_action(ctx)
    before = None if vm is REMOVED else vm.state
    if before == "Stopped":
        vm.state = "Starting"

    def work() -> dict:
        if vm is REMOVED or vm.id not in st.vms:
            raise invalid(f"unable to find a virtual machine with id {ctx.params['id']}")
        if before == "Running":
            raise invalid(f"The virtual machine {vm.id} ({vm.displayname}) is already running")
        if before != "Stopped":
            raise invalid(f"Unable to start VM {vm.name}: it is in state {before}")
        _power_on(st, vm)
        return {"virtualmachine": st.render_vm(vm)}

    def on_fail() -> None:
        if vm is not REMOVED and vm.state == "Starting":
            vm.state = before

    return Submit(work, instance_id=None if vm is REMOVED else vm.id, on_fail=on_fail)


@command("stopVirtualMachine", is_async=True, cmd_class=_VM_CMD + "StopVMCmd",
         instance_type="VirtualMachine")
def stop_virtual_machine(ctx: Ctx) -> Submit:
    st = ctx.state
    vm = _vm_for_action(ctx)
    ctx.bool("forced", False)
    before = None if vm is REMOVED else vm.state
    if before == "Running":
        vm.state = "Stopping"

    def work() -> dict:
        if vm is REMOVED or vm.id not in st.vms:
            raise invalid(f"unable to find a virtual machine with id {ctx.params['id']}")
        if before not in ("Running", "Stopped"):
            raise invalid(f"Unable to stop VM {vm.name}: it is in state {before}")
        vm.state = "Stopped"
        return {"virtualmachine": st.render_vm(vm)}

    def on_fail() -> None:
        if vm is not REMOVED and vm.state == "Stopping":
            vm.state = before

    return Submit(work, instance_id=None if vm is REMOVED else vm.id, on_fail=on_fail)


@command("destroyVirtualMachine", is_async=True, cmd_class=_VM_CMD + "DestroyVMCmd",
         instance_type="VirtualMachine")
def destroy_virtual_machine(ctx: Ctx) -> Submit:
    st = ctx.state
    vm = _vm_for_action(ctx)
    expunge = ctx.bool("expunge", False)
    extra = ctx.entities("volumeids", "volume")
    for vol in extra:
        ctx.check_access(vol)
    extra_ids = {vol.id for vol in extra if vol is not REMOVED}

    def work() -> dict:
        if vm is REMOVED or vm.id not in st.vms:
            raise invalid(f"Unable to find a virtual machine with specified vmId "
                          f"{ctx.params['id']}")
        for vol in extra:
            if vol is REMOVED or vol.vm_id != vm.id or vol.type != "DATADISK":
                raise invalid(f"Please specify volumes that belong to the VM {vm.id} and are "
                              "DATADISK volumes")
        if vm.state == "Destroyed" and not expunge:
            raise invalid(f"Vm {vm.name} is already destroyed")
        for vol in st.vm_volumes(vm.id):
            if vol.type == "ROOT":
                vol.state = "Destroy"
                if expunge:
                    vol.vm_id = vol.device_id = vol.attached = None
                    st.remove("volume", vol.id)
                    st.volume_file(vol.id).unlink(missing_ok=True)
            elif vol.id in extra_ids or expunge:
                vol.vm_id = vol.device_id = vol.attached = None
                if vol.id in extra_ids:
                    st.remove("volume", vol.id)
                    st.volume_file(vol.id).unlink(missing_ok=True)
        vm.state = "Expunging" if expunge else "Destroyed"
        rendered = st.render_vm(vm)
        if expunge:
            st.remove("vm", vm.id)
        return {"virtualmachine": rendered}

    return Submit(work, instance_id=None if vm is REMOVED else vm.id)


# ===================================================================================== snapshots

_SNAP_CMD = "org.apache.cloudstack.api.command.user.snapshot."


@command("createSnapshot", is_async=True, creates=True, cmd_class=_SNAP_CMD + "CreateSnapshotCmd",
         instance_type="Snapshot")
def create_snapshot(ctx: Ctx) -> Submit:
    st = ctx.state
    vol = ctx.entity("volumeid", "volume", required=True)
    name = ctx.str("name")
    ctx.bool("quiescevm", False)
    if vol is REMOVED:
        raise invalid(f"Unable to find volume with ID: {ctx.params['volumeid']}")
    ctx.check_access(vol)
    if vol.state != "Ready":
        raise invalid(f"VolumeId: {vol.id} is not in Ready state but {vol.state}. Cannot take "
                      "snapshot.")
    vm = st.vms.get(vol.vm_id or "")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    snap = Snapshot(new_uuid(), st.next_internal("snapshot"),
                    name or f"{vm.name if vm else 'detached'}_{vol.name}_{stamp}", vol.id, vol.name,
                    vol.type, vol.account_id, vol.zone_id, "Allocated")
    st.snapshots[snap.id] = snap

    def work() -> dict:
        if vol.id not in st.volumes:
            raise runtime_error(f"Failed to create snapshot: volume {vol.id} no longer exists")
        sparse_copy(st.volume_file(vol.id), st.snapshot_file(snap.id))
        snap.size = vol.size
        snap.state = "BackedUp"
        return {"snapshot": st.render_snapshot(snap)}

    def on_fail() -> None:
        if snap.id in st.snapshots:
            snap.state = "Error"

    return Submit(work, instance_id=snap.id, object_id=snap.id, on_fail=on_fail)


@command("revertSnapshot", is_async=True, cmd_class=_SNAP_CMD + "RevertSnapshotCmd",
         instance_type="Snapshot")
def revert_snapshot(ctx: Ctx) -> Submit:
    st = ctx.state
    snap = ctx.entity("id", "snapshot", required=True)
    ctx.check_access(snap)

    def work() -> dict:
        if snap is REMOVED or snap.id not in st.snapshots:
            raise invalid("No such snapshot")
        if snap.state != "BackedUp":
            raise invalid(f"Snapshot {snap.id} is in state {snap.state}; only BackedUp snapshots "
                          "can be reverted")
        vol = st.volumes.get(snap.volume_id)
        if vol is None:
            raise runtime_error(f"Unable to revert snapshot {snap.id}: its volume no longer exists")
        if vol.state != "Ready":
            raise invalid("The volume is not in Ready state.")
        vm = st.vms.get(vol.vm_id or "")
        if vm is not None and vm.state not in ("Stopped", "Shutdowned"):
            raise invalid("The VM the specified disk is attached to is not in the shutdown state.")
        restore_into(st.snapshot_file(snap.id), st.volume_file(vol.id))
        vol.size = snap.size
        return {"snapshot": st.render_snapshot(snap)}

    return Submit(work, instance_id=None if snap is REMOVED else snap.id)


@command("deleteSnapshot", is_async=True, cmd_class=_SNAP_CMD + "DeleteSnapshotCmd",
         instance_type="Snapshot")
def delete_snapshot(ctx: Ctx) -> Submit:
    st = ctx.state
    snap = ctx.entity("id", "snapshot", required=True)
    ctx.check_access(snap)

    def work() -> dict:
        if snap is REMOVED or snap.id not in st.snapshots:
            raise invalid(f"unable to find a snapshot with id {ctx.params['id']}")
        st.remove("snapshot", snap.id)
        st.snapshot_file(snap.id).unlink(missing_ok=True)
        return {"success": True}

    return Submit(work, instance_id=None if snap is REMOVED else snap.id)

