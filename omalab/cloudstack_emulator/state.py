"""In-memory CloudStack inventory, its seed, and the JSON CloudStack renders for each entity.

Everything is guarded by ``State.lock`` (an RLock): HTTP handler threads and the job thread take it
around every read and mutation.  Volume and snapshot *contents* live in files under the state dir;
everything else lives only in memory.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .storage import byid_name, create_sparse

GiB = 1 << 30

# Lab-stable ids for the seeded objects: the same names give the same uuids on every start.
_SEED_NS = uuid.UUID("6f1d7c1e-0b7a-4c55-9c8e-5e1a0c0de5ed")

REMOVED = object()
"""Returned by lookups for an id that existed but was deleted/expunged (CloudStack still finds such
rows when translating ids, so lists filtered by them come back empty instead of failing)."""

# KVM: hypervisor_capabilities.max_data_volumes_limit; device ids 0 (root) .. limit+1, 3 is the CD-ROM.
MAX_DATA_VOLUMES = 26
MAX_DEVICE_ID = MAX_DATA_VOLUMES + 1


def now_str() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")


def seed_uuid(kind: str, name: str) -> str:
    return str(uuid.uuid5(_SEED_NS, f"{kind}:{name}"))


def new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass
class Domain:
    id: str
    internal_id: int
    name: str
    path: str


@dataclass
class User:
    id: str
    internal_id: int
    username: str
    account_id: str
    api_key: str
    secret_key: str
    state: str = "enabled"
    created: str = field(default_factory=now_str)


@dataclass
class Account:
    id: str
    internal_id: int
    name: str
    type: int  # 0 user, 1 root admin, 2 domain admin
    domain_id: str
    role_name: str
    role_type: str
    state: str = "enabled"
    created: str = field(default_factory=now_str)

    @property
    def is_admin(self) -> bool:
        return self.type in (1, 2)


@dataclass
class Zone:
    id: str
    internal_id: int
    name: str
    description: str
    guest_cidr: str
    dns1: str


@dataclass
class DiskOffering:
    id: str
    internal_id: int
    name: str
    displaytext: str
    disksize_gb: int  # 0 for custom
    iscustomized: bool
    created: str = field(default_factory=now_str)


@dataclass
class ServiceOffering:
    id: str
    internal_id: int
    name: str
    displaytext: str
    cpunumber: int | None
    cpuspeed: int | None
    memory: int | None
    iscustomized: bool
    created: str = field(default_factory=now_str)


@dataclass
class Template:
    id: str
    internal_id: int
    name: str
    displaytext: str
    size: int
    isready: bool
    ispublic: bool
    isfeatured: bool
    account_id: str
    zone_ids: list[str]
    ostypename: str
    templatetype: str = "USER"
    created: str = field(default_factory=now_str)


@dataclass
class Network:
    id: str
    internal_id: int
    name: str
    displaytext: str
    zone_id: str
    type: str  # Isolated | Shared
    cidr: str
    account_id: str | None  # None: domain-wide shared network
    domain_id: str
    state: str
    vlan: int
    isdefault: bool = False
    next_host: int = 10
    created: str = field(default_factory=now_str)

    @property
    def prefix(self) -> str:
        return self.cidr.rsplit(".", 1)[0]

    @property
    def gateway(self) -> str:
        return self.prefix + ".1"


@dataclass
class Nic:
    id: str
    network_id: str
    macaddress: str
    ipaddress: str
    isdefault: bool
    deviceid: int


@dataclass
class VirtualMachine:
    id: str
    internal_id: int
    name: str
    displayname: str
    account_id: str
    user_id: str
    zone_id: str
    template_id: str
    service_offering_id: str
    cpunumber: int
    cpuspeed: int
    memory: int
    state: str
    nics: list[Nic] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now_str)


@dataclass
class Volume:
    id: str
    internal_id: int
    name: str
    account_id: str
    zone_id: str
    type: str  # ROOT | DATADISK
    size: int
    state: str  # Allocated | Ready | Destroy
    disk_offering_id: str | None = None
    template_id: str | None = None
    vm_id: str | None = None
    device_id: int | None = None
    attached: str | None = None
    created: str = field(default_factory=now_str)


@dataclass
class Snapshot:
    id: str
    internal_id: int
    name: str
    volume_id: str
    volume_name: str
    volume_type: str
    account_id: str
    zone_id: str
    state: str  # Allocated | BackedUp | Error
    size: int = 0
    created: str = field(default_factory=now_str)


@dataclass
class Job:
    id: str
    command: str
    cmd_class: str
    account_id: str
    user_id: str
    instance_type: str | None
    instance_id: str | None
    status: int = 0  # 0 pending, 1 succeeded, 2 failed
    resultcode: int = 0
    result: dict | None = None
    created: str = field(default_factory=now_str)
    completed: str | None = None


_KINDS = {
    "zone": "zones",
    "diskoffering": "disk_offerings",
    "serviceoffering": "service_offerings",
    "template": "templates",
    "network": "networks",
    "vm": "vms",
    "volume": "volumes",
    "snapshot": "snapshots",
    "account": "accounts",
    "domain": "domains",
    "user": "users",
    "job": "jobs",
}


class State:
    """The emulated CloudStack's data, seeded with a small but realistic inventory."""

    def __init__(
        self,
        state_dir: Path,
        byid_dir: Path,
        *,
        oma_mac: str,
        api_key: str,
        secret_key: str,
        second_api_key: str,
        second_secret_key: str,
        oma_vm_account: str = "admin",
    ) -> None:
        self.lock = threading.RLock()
        self.state_dir = Path(state_dir)
        self.volumes_dir = self.state_dir / "volumes"
        self.snapshots_dir = self.state_dir / "snapshots"
        self.byid_dir = Path(byid_dir)
        self.oma_mac = oma_mac.lower()
        self.keys = (api_key, secret_key, second_api_key, second_secret_key)
        self.oma_vm_account = oma_vm_account
        self._rng = random.Random()
        self.seed()

    # ------------------------------------------------------------------ seed

    def _clear(self) -> None:
        self.domains: dict[str, Domain] = {}
        self.accounts: dict[str, Account] = {}
        self.users: dict[str, User] = {}
        self.zones: dict[str, Zone] = {}
        self.disk_offerings: dict[str, DiskOffering] = {}
        self.service_offerings: dict[str, ServiceOffering] = {}
        self.templates: dict[str, Template] = {}
        self.networks: dict[str, Network] = {}
        self.vms: dict[str, VirtualMachine] = {}
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.jobs: dict[str, Job] = {}
        self.removed: dict[str, str] = {}  # uuid -> kind
        self._counters: dict[str, int] = {}
        self._macs: set[str] = set()
        self.ids: dict[str, str] = {}

    def next_internal(self, kind: str) -> int:
        self._counters[kind] = self._counters.get(kind, 0) + 1
        return self._counters[kind]

    def seed(self) -> None:
        """(Re)build the inventory and the files under the state dir."""
        with self.lock:
            for d in (self.volumes_dir, self.snapshots_dir, self.byid_dir):
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
            self._clear()
            self._seed()
            self.sync_links()

    def _seed(self) -> None:
        api_key, secret_key, api_key2, secret_key2 = self.keys
        ids = self.ids

        root = Domain(seed_uuid("domain", "ROOT"), self.next_internal("domain"), "ROOT", "ROOT")
        self.domains[root.id] = root
        ids["domain"] = root.id

        def add_account(name, acct_type, role_name, role_type, username, key, secret):
            acct = Account(seed_uuid("account", name), self.next_internal("account"), name,
                           acct_type, root.id, role_name, role_type)
            self.accounts[acct.id] = acct
            user = User(seed_uuid("user", username), self.next_internal("user"), username,
                        acct.id, key, secret)
            self.users[user.id] = user
            return acct, user

        admin, admin_user = add_account("admin", 1, "Root Admin", "Admin", "admin", api_key, secret_key)
        tenant, tenant_user = add_account("tenant-b", 0, "User", "User", "tenant-b-user",
                                          api_key2, secret_key2)
        ids.update(account=admin.id, user=admin_user.id, second_account=tenant.id,
                   second_user=tenant_user.id)

        def add_zone(name, desc, cidr):
            z = Zone(seed_uuid("zone", name), self.next_internal("zone"), name, desc, cidr, "8.8.8.8")
            self.zones[z.id] = z
            return z

        za = add_zone("zone-a", "Primary site", "10.1.0.0/16")
        zb = add_zone("zone-b", "DR site", "10.2.0.0/16")
        ids.update(zone=za.id, zone2=zb.id)

        def add_do(key, name, text, size_gb, custom):
            o = DiskOffering(seed_uuid("diskoffering", name), self.next_internal("diskoffering"),
                             name, text, size_gb, custom)
            self.disk_offerings[o.id] = o
            ids[key] = o.id

        add_do("disk_offering", "Custom", "Custom size disk", 0, True)
        add_do("disk_offering_small", "Small", "Small Disk, 5 GB", 5, False)
        add_do("disk_offering_medium", "Medium", "Medium Disk, 20 GB", 20, False)
        add_do("disk_offering_large", "Large", "Large Disk, 100 GB", 100, False)

        def add_so(key, name, text, cpu, speed, mem, custom):
            o = ServiceOffering(seed_uuid("serviceoffering", name),
                                self.next_internal("serviceoffering"), name, text, cpu, speed, mem,
                                custom)
            self.service_offerings[o.id] = o
            ids[key] = o.id
            return o

        add_so("service_offering", "Custom Instance", "Custom CPU and memory",
               None, None, None, True)
        so_small = add_so("service_offering_small", "Small Instance", "1 vCPU, 1 GB RAM",
                          1, 1000, 1024, False)
        so_medium = add_so("service_offering_medium", "Medium Instance", "2 vCPU, 4 GB RAM",
                           2, 2000, 4096, False)

        def add_tpl(key, name, text, size, ready, public, featured, owner, zones, os_name):
            t = Template(seed_uuid("template", name), self.next_internal("template"), name, text,
                         size, ready, public, featured, owner.id, [z.id for z in zones], os_name)
            self.templates[t.id] = t
            ids[key] = t.id
            return t

        t_ubuntu = add_tpl("template", "Ubuntu 22.04 Minimal", "Ubuntu 22.04 LTS minimal cloud image",
                           int(1.5 * GiB), True, True, True, admin, [za, zb], "Ubuntu 22.04 LTS")
        add_tpl("template_boot_stub", "Migration Boot Stub", "Empty boot stub for migrated VMs",
                1 * GiB, True, False, False, admin, [za], "Other Linux (64-bit)")
        add_tpl("template_2gib", "Debian 12 Generic", "Debian 12 generic cloud image",
                2 * GiB, True, True, True, admin, [za], "Debian GNU/Linux 12 (64-bit)")
        t_rocky = add_tpl("template_large", "Rocky Linux 9", "Rocky Linux 9 (community)",
                          10 * GiB, True, True, False, admin, [za], "Rocky Linux 9")
        add_tpl("template_windows", "Windows Server 2022", "Windows Server 2022 Standard",
                20 * GiB, True, True, True, admin, [za, zb], "Windows Server 2022 (64-bit)")
        add_tpl("template_not_ready", "Ubuntu 24.04 Minimal", "Ubuntu 24.04 LTS (still downloading)",
                1 * GiB, False, False, False, admin, [za], "Ubuntu 24.04 LTS")
        add_tpl("template_private_other", "Tenant B Golden Image", "Private template of tenant-b",
                1 * GiB, True, False, False, tenant, [za], "Other Linux (64-bit)")

        def add_net(key, name, zone, ntype, cidr, owner, state, vlan, isdefault=False):
            n = Network(seed_uuid("network", name), self.next_internal("network"), name, name,
                        zone.id, ntype, cidr, owner.id if owner else None, root.id, state, vlan,
                        isdefault)
            self.networks[n.id] = n
            ids[key] = n.id
            return n

        n_mgmt = add_net("network_oma", "oma-mgmt-network", za, "Isolated", "10.10.0.0/24", admin,
                         "Implemented", 100)
        n_prod = add_net("network", "prod-network", za, "Isolated", "10.20.0.0/24", admin,
                         "Implemented", 101, isdefault=True)
        add_net("network_test", "test-isolated-network", za, "Isolated", "10.30.0.0/24", admin,
                "Allocated", 102)
        add_net("network_shared", "shared-guest-network", za, "Shared", "192.168.100.0/24", None,
                "Setup", 103)
        n_dr = add_net("network_zone2", "dr-network", zb, "Isolated", "10.40.0.0/24", admin,
                       "Implemented", 201)
        add_net("network_zone2_test", "dr-test-isolated", zb, "Isolated", "10.50.0.0/24", admin,
                "Allocated", 202)
        n_tenant = add_net("network_other", "tenant-b-network", za, "Isolated", "10.60.0.0/24",
                           tenant, "Implemented", 104)

        oma_owner = admin if self.oma_vm_account == admin.name else tenant
        oma_user = admin_user if oma_owner is admin else tenant_user
        oma = self.add_vm("oma-appliance", "OMA Appliance", oma_owner, oma_user, za, t_ubuntu,
                          so_medium, [n_mgmt], "Running", root_size=20 * GiB, mac=self.oma_mac,
                          vm_uuid=seed_uuid("vm", "oma-appliance"))
        ids["oma_vm"] = oma.id
        web1 = self.add_vm("web-01", "web-01", admin, admin_user, za, t_ubuntu, so_small, [n_prod],
                           "Running", vm_uuid=seed_uuid("vm", "web-01"))
        self.add_vm("web-02", "web-02", admin, admin_user, za, t_ubuntu, so_small, [n_prod],
                    "Stopped", vm_uuid=seed_uuid("vm", "web-02"))
        self.add_vm("db-01", "db-01", admin, admin_user, zb, t_rocky, so_medium, [n_dr], "Running",
                    vm_uuid=seed_uuid("vm", "db-01"))
        other = self.add_vm("tenant-b-app", "tenant-b-app", tenant, tenant_user, za, t_ubuntu,
                            so_small, [n_tenant], "Running", vm_uuid=seed_uuid("vm", "tenant-b-app"))
        ids.update(vm_web01=web1.id, vm_other=other.id)

        data = self.add_volume("web-01-data", admin, za, "DATADISK", 50 * GiB, "Ready",
                               disk_offering_id=ids["disk_offering"],
                               vol_uuid=seed_uuid("volume", "web-01-data"))
        data.vm_id, data.device_id, data.attached = web1.id, 1, now_str()
        spare = self.add_volume("spare-data", admin, za, "DATADISK", 5 * GiB, "Ready",
                                disk_offering_id=ids["disk_offering_small"],
                                vol_uuid=seed_uuid("volume", "spare-data"))
        ids.update(volume_web01_data=data.id, volume_spare=spare.id)

    # ------------------------------------------------------------------ factories

    def new_mac(self) -> str:
        while True:
            mac = "1e:00:" + ":".join(f"{self._rng.randrange(256):02x}" for _ in range(4))
            if mac not in self._macs and mac != self.oma_mac:
                self._macs.add(mac)
                return mac

    def new_ip(self, net: Network) -> str:
        ip = f"{net.prefix}.{net.next_host}"
        net.next_host += 1
        return ip

    def add_volume(self, name, owner: Account, zone: Zone, vtype: str, size: int, state: str, *,
                   disk_offering_id=None, template_id=None, vol_uuid=None) -> Volume:
        vol = Volume(vol_uuid or new_uuid(), self.next_internal("volume"), name, owner.id, zone.id,
                     vtype, size, state, disk_offering_id=disk_offering_id, template_id=template_id)
        self.volumes[vol.id] = vol
        create_sparse(self.volume_file(vol.id), size)
        return vol

    def add_vm(self, name, displayname, owner: Account, user: User, zone: Zone, template: Template,
               offering: ServiceOffering, networks: list[Network], state: str, *,
               root_size: int | None = None, mac: str | None = None, vm_uuid: str | None = None,
               cpunumber=None, cpuspeed=None, memory=None, details=None) -> VirtualMachine:
        """Create a VM with its NICs and ROOT volume (state Ready unless the VM never started)."""
        vm = VirtualMachine(
            vm_uuid or new_uuid(), self.next_internal("vm"), name, displayname, owner.id, user.id,
            zone.id, template.id, offering.id,
            cpunumber if cpunumber is not None else offering.cpunumber or 1,
            cpuspeed if cpuspeed is not None else offering.cpuspeed or 1000,
            memory if memory is not None else offering.memory or 1024,
            state, details=dict(details or {}),
        )
        for index, net in enumerate(networks):
            nic_mac = mac.lower() if (mac and index == 0) else self.new_mac()
            vm.nics.append(Nic(new_uuid(), net.id, nic_mac, self.new_ip(net), index == 0, index))
            if net.state == "Allocated" and state == "Running":
                net.state = "Implemented"
        self.vms[vm.id] = vm
        root_state = "Ready" if state in ("Running", "Stopped") else "Allocated"
        root = self.add_volume(f"ROOT-{vm.internal_id}", owner, zone, "ROOT",
                               root_size or template.size, root_state, template_id=template.id)
        root.vm_id, root.device_id, root.attached = vm.id, 0, now_str()
        return vm

    # ------------------------------------------------------------------ lookups

    def table(self, kind: str) -> dict:
        return getattr(self, _KINDS[kind])

    def lookup(self, kind: str, value: str):
        """An entity by uuid (or CloudStack internal id), REMOVED, or None when unknown."""
        table = self.table(kind)
        if value in table:
            return table[value]
        if self.removed.get(value) == kind:
            return REMOVED
        if value.isdigit():
            for obj in table.values():
                if getattr(obj, "internal_id", None) == int(value):
                    return obj
        return None

    def remove(self, kind: str, obj_id: str) -> None:
        self.table(kind).pop(obj_id, None)
        self.removed[obj_id] = kind

    def user_by_key(self, api_key: str) -> User | None:
        for user in self.users.values():
            if user.api_key == api_key:
                return user
        return None

    def vm_volumes(self, vm_id: str) -> list[Volume]:
        return sorted((v for v in self.volumes.values() if v.vm_id == vm_id),
                      key=lambda v: (v.device_id if v.device_id is not None else 99))

    @property
    def oma_vm_id(self) -> str:
        return self.ids["oma_vm"]

    # ------------------------------------------------------------------ files and device links

    def volume_file(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}.img"

    def snapshot_file(self, snapshot_id: str) -> Path:
        return self.snapshots_dir / f"{snapshot_id}.img"

    def link_path(self, volume_id: str) -> Path:
        return self.byid_dir / byid_name(volume_id)

    def sync_links(self) -> None:
        """Make ``byid_dir`` show exactly the disks the running OMA appliance VM sees."""
        oma = self.vms.get(self.ids.get("oma_vm", ""))
        wanted: dict[str, Path] = {}
        if oma is not None and oma.state == "Running":
            for vol in self.vm_volumes(oma.id):
                wanted[byid_name(vol.id)] = self.volume_file(vol.id)
        self.byid_dir.mkdir(parents=True, exist_ok=True)
        for entry in os.listdir(self.byid_dir):
            if entry.startswith("virtio-") and entry not in wanted:
                (self.byid_dir / entry).unlink(missing_ok=True)
        for name, target in wanted.items():
            link = self.byid_dir / name
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            link.unlink(missing_ok=True)
            link.symlink_to(target)

    # ------------------------------------------------------------------ rendering (CloudStack JSON)

    def _owner_fields(self, account_id: str | None, domain_id: str | None = None) -> dict:
        out: dict = {}
        if account_id:
            acct = self.accounts.get(account_id)
            if acct:
                out["account"] = acct.name
                domain_id = acct.domain_id
        dom = self.domains.get(domain_id or "")
        if dom:
            out.update(domainid=dom.id, domain=dom.name, domainpath=dom.path)
        return out

    def render_zone(self, z: Zone) -> dict:
        return {
            "id": z.id, "name": z.name, "description": z.description, "dns1": z.dns1,
            "internaldns1": "10.0.0.2", "guestcidraddress": z.guest_cidr,
            "networktype": "Advanced", "securitygroupsenabled": False, "allocationstate": "Enabled",
            "zonetoken": seed_uuid("zonetoken", z.name), "dhcpprovider": "VirtualRouter",
            "localstorageenabled": False, "tags": [], "hasannotations": False, "type": "Core",
        }

    def render_disk_offering(self, o: DiskOffering) -> dict:
        return {
            "id": o.id, "name": o.name, "displaytext": o.displaytext, "disksize": o.disksize_gb,
            "created": o.created, "iscustomized": o.iscustomized, "storagetype": "shared",
            "provisioningtype": "thin", "cacheMode": "none", "displayoffering": True,
            "iscustomizediops": False, "encrypt": False, "disksizestrictness": False,
            "hasannotations": False,
        }

    def render_service_offering(self, o: ServiceOffering) -> dict:
        out = {"id": o.id, "name": o.name, "displaytext": o.displaytext}
        if not o.iscustomized:
            out.update(cpunumber=o.cpunumber, cpuspeed=o.cpuspeed, memory=o.memory)
        out.update(
            created=o.created, storagetype="shared", provisioningtype="thin", offerha=False,
            limitcpuuse=False, isvolatile=False, issystem=False, defaultuse=False,
            iscustomized=o.iscustomized, cacheMode="none", dynamicscalingenabled=True,
            diskofferingstrictness=False, hasannotations=False,
        )
        return out

    def render_template(self, t: Template, zone_id: str) -> dict:
        zone = self.zones[zone_id]
        out = {
            "id": t.id, "name": t.name, "displaytext": t.displaytext, "ispublic": t.ispublic,
            "created": t.created, "isready": t.isready, "passwordenabled": False, "format": "QCOW2",
            "isfeatured": t.isfeatured, "crossZones": False,
            "ostypeid": seed_uuid("ostype", t.ostypename), "ostypename": t.ostypename,
            **self._owner_fields(t.account_id), "zoneid": zone.id, "zonename": zone.name,
            "status": "Download Complete" if t.isready else "45% Downloaded",
            "templatetype": t.templatetype, "hypervisor": "KVM", "isextractable": False,
            "sshkeyenabled": False, "isdynamicallyscalable": False, "directdownload": False,
            "deployasis": False, "requireshvm": True, "tags": [], "hasannotations": False,
        }
        if t.isready:
            out["size"] = t.size
            out["physicalsize"] = t.size // 3
        return out

    def render_network(self, n: Network) -> dict:
        zone = self.zones[n.zone_id]
        out = {
            "id": n.id, "name": n.name, "displaytext": n.displaytext, "broadcastdomaintype": "Vlan",
            "traffictype": "Guest", "gateway": n.gateway, "netmask": "255.255.255.0",
            "cidr": n.cidr, "zoneid": zone.id, "zonename": zone.name,
            "networkofferingid": seed_uuid("networkoffering", n.type),
            "networkofferingname": ("DefaultIsolatedNetworkOfferingWithSourceNatService"
                                    if n.type == "Isolated" else "DefaultSharedNetworkOffering"),
            "networkofferingdisplaytext": f"Offering for {n.type} networks",
            "networkofferingconservemode": True, "networkofferingavailability": "Optional",
            "issystem": False, "state": n.state, "related": n.id, "dns1": zone.dns1,
            "type": n.type, "acltype": "Account" if n.account_id else "Domain",
            **self._owner_fields(n.account_id, n.domain_id),
            "networkdomain": "cs1cloud.internal", "isdefault": n.isdefault,
            "restartrequired": False, "specifyipranges": n.type == "Shared",
            "canusefordeploy": True, "ispersistent": False, "displaynetwork": True,
            "redundantrouter": False, "service": [], "tags": [], "hasannotations": False,
            "created": n.created,
        }
        if n.state != "Allocated" or n.type == "Shared":
            out["broadcasturi"] = f"vlan://{n.vlan}"
            out["vlan"] = str(n.vlan)
        return out

    def render_nic(self, nic: Nic) -> dict:
        net = self.networks.get(nic.network_id)
        return {
            "id": nic.id, "networkid": nic.network_id, "networkname": net.name if net else "",
            "netmask": "255.255.255.0", "gateway": net.gateway if net else "",
            "ipaddress": nic.ipaddress, "isolationuri": f"vlan://{net.vlan}" if net else "",
            "broadcasturi": f"vlan://{net.vlan}" if net else "", "traffictype": "Guest",
            "type": net.type if net else "Isolated", "isdefault": nic.isdefault,
            "macaddress": nic.macaddress, "deviceid": str(nic.deviceid),
            "secondaryip": [], "extradhcpoption": [],
        }

    def render_vm(self, vm: VirtualMachine) -> dict:
        acct = self.accounts[vm.account_id]
        user = self.users.get(vm.user_id)
        zone = self.zones[vm.zone_id]
        tpl = self.templates.get(vm.template_id)
        so = self.service_offerings.get(vm.service_offering_id)
        out = {
            "id": vm.id, "name": vm.name, "displayname": vm.displayname,
            **self._owner_fields(vm.account_id),
            "userid": vm.user_id, "username": user.username if user else "",
            "created": vm.created, "state": vm.state, "haenable": False,
            "zoneid": zone.id, "zonename": zone.name,
        }
        if vm.state == "Running":
            out.update(hostid=seed_uuid("host", zone.name), hostname=f"kvm-{zone.name}-01")
        out.update({
            "templateid": vm.template_id, "templatename": tpl.name if tpl else "",
            "templatedisplaytext": tpl.displaytext if tpl else "", "passwordenabled": False,
            "serviceofferingid": vm.service_offering_id,
            "serviceofferingname": so.name if so else "",
            "cpunumber": vm.cpunumber, "cpuspeed": vm.cpuspeed, "memory": vm.memory,
            "guestosid": seed_uuid("ostype", tpl.ostypename if tpl else ""),
            "ostypeid": seed_uuid("ostype", tpl.ostypename if tpl else ""),
            "osdisplayname": tpl.ostypename if tpl else "",
            "rootdeviceid": 0, "rootdevicetype": "ROOT", "securitygroup": [],
            "nic": [self.render_nic(n) for n in vm.nics], "hypervisor": "KVM",
            "instancename": f"i-{acct.internal_id}-{vm.internal_id}-VM",
            "isdynamicallyscalable": False, "affinitygroup": [], "tags": [],
            "details": dict(vm.details), "hasannotations": False,
        })
        return out

    def render_volume(self, vol: Volume) -> dict:
        zone = self.zones[vol.zone_id]
        out = {
            "id": vol.id, "name": vol.name, "zoneid": zone.id, "zonename": zone.name,
            "type": vol.type, "provisioningtype": "thin", "size": vol.size,
            "created": vol.created, "state": vol.state, **self._owner_fields(vol.account_id),
            "storagetype": "shared", "hypervisor": "KVM" if vol.state == "Ready" else "None",
            "destroyed": vol.state == "Destroy", "isextractable": True, "displayvolume": True,
            "quiescevm": False, "supportsstoragesnapshot": False, "hasannotations": False,
        }
        off = self.disk_offerings.get(vol.disk_offering_id or "")
        if off:
            out.update(diskofferingid=off.id, diskofferingname=off.name,
                       diskofferingdisplaytext=off.displaytext)
        tpl = self.templates.get(vol.template_id or "")
        if tpl:
            out.update(templateid=tpl.id, templatename=tpl.name, templatedisplaytext=tpl.displaytext)
        vm = self.vms.get(vol.vm_id or "")
        if vm:
            if vol.type == "ROOT":
                so = self.service_offerings.get(vm.service_offering_id)
                out.update(serviceofferingid=vm.service_offering_id,
                           serviceofferingname=so.name if so else "")
            out.update(virtualmachineid=vm.id, vmname=vm.name, vmdisplayname=vm.displayname,
                       vmstate=vm.state, vmtype="User", deviceid=vol.device_id,
                       attached=vol.attached)
        if vol.state == "Ready":
            out.update(storageid=seed_uuid("storagepool", zone.name),
                       storage=f"primary-{zone.name}", path=vol.id)
        return out

    def render_snapshot(self, s: Snapshot) -> dict:
        zone = self.zones.get(s.zone_id)
        return {
            "id": s.id, **self._owner_fields(s.account_id), "snapshottype": "MANUAL",
            "volumeid": s.volume_id, "volumename": s.volume_name, "volumetype": s.volume_type,
            "created": s.created, "name": s.name, "intervaltype": "MANUAL", "state": s.state,
            "physicalsize": s.size, "virtualsize": s.size,
            "zoneid": s.zone_id, "zonename": zone.name if zone else "", "revertable": True,
            "locationtype": "Primary", "tags": [], "hasannotations": False,
        }

    def render_account(self, a: Account) -> dict:
        dom = self.domains[a.domain_id]
        users = []
        for u in self.users.values():
            if u.account_id != a.id:
                continue
            users.append({
                "id": u.id, "username": u.username, "firstname": u.username, "lastname": "user",
                "email": f"{u.username}@example.invalid", "created": u.created, "state": u.state,
                "account": a.name, "accounttype": a.type, "usersource": "native",
                "roleid": seed_uuid("role", a.role_name), "roletype": a.role_type,
                "rolename": a.role_name, "domainid": dom.id, "domain": dom.name,
                "accountid": a.id, "apikey": u.api_key, "iscallerchilddomain": False,
                "isdefault": a.name == "admin",
            })
        vms = [v for v in self.vms.values() if v.account_id == a.id]
        return {
            "id": a.id, "name": a.name, "accounttype": a.type,
            "roleid": seed_uuid("role", a.role_name), "rolename": a.role_name,
            "roletype": a.role_type, "domainid": dom.id, "domain": dom.name,
            "domainpath": dom.path, "state": a.state, "created": a.created,
            "isdefault": a.name == "admin", "vmtotal": len(vms),
            "vmrunning": sum(v.state == "Running" for v in vms),
            "vmstopped": sum(v.state == "Stopped" for v in vms),
            "vmlimit": "Unlimited", "volumetotal": sum(v.account_id == a.id
                                                       for v in self.volumes.values()),
            "user": users,
        }

    def render_job(self, job: Job) -> dict:
        out = {
            "accountid": job.account_id, "userid": job.user_id, "cmd": job.cmd_class,
            "jobstatus": job.status, "jobprocstatus": 0, "jobresultcode": job.resultcode,
        }
        if job.status != 0:
            out["jobresulttype"] = "object"
            out["jobresult"] = job.result if job.result is not None else {}
        if job.instance_type and job.instance_id:
            out.update(jobinstancetype=job.instance_type, jobinstanceid=job.instance_id)
        out["created"] = job.created
        if job.completed:
            out["completed"] = job.completed
        out["jobid"] = job.id
        return out
