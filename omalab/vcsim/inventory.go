package main

// Inventory: datastores in our own folders, standard + distributed port groups, nested VM
// folders and the VMs (real sparse raw disk files), plus a JSON manifest for callers.

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io/ioutil"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type guestOS struct {
	id, full string
	windows  bool
}

// Valid in the 0.24.2 simulator's GuestID list.
var guestOSes = []guestOS{
	{"windows9Server64Guest", "Microsoft Windows Server 2016 or later (64-bit)", true},
	{"rhel7_64Guest", "Red Hat Enterprise Linux 7 (64-bit)", false},
	{"ubuntu64Guest", "Ubuntu Linux (64-bit)", false},
	{"windows8Server64Guest", "Microsoft Windows Server 2012 (64-bit)", true},
	{"centos7_64Guest", "CentOS 7 (64-bit)", false},
	{"debian10_64Guest", "Debian GNU/Linux 10 (64-bit)", false},
	{"windows9_64Guest", "Microsoft Windows 10 (64-bit)", true},
	{"sles12_64Guest", "SUSE Linux Enterprise 12 (64-bit)", false},
}

// Tools flavours: "ok" (running, current), "old" (running, outdated), "none" (not installed).
func toolsFlavour(i int) string {
	switch i % 10 {
	case 9:
		return "none"
	case 4:
		return "old"
	}
	return "ok"
}

func powerStateFor(i int) types.VirtualMachinePowerState {
	switch {
	case i%4 == 3:
		return types.VirtualMachinePowerStatePoweredOff
	case i%23 == 22:
		return types.VirtualMachinePowerStateSuspended
	}
	return types.VirtualMachinePowerStatePoweredOn
}

type diskInfo struct {
	Key        int32  `json:"key"`
	Index      int    `json:"index"`
	Controller int32  `json:"controller_key"`
	Unit       int32  `json:"unit_number"`
	FileName   string `json:"file_name"` // datastore path "[ds] vm/vm.vmdk"
	Path       string `json:"path"`      // local raw file
	Capacity   int64  `json:"capacity"`
	Thin       bool   `json:"thin"`
}

type nicInfo struct {
	Key     int32  `json:"key"`
	Network string `json:"network"`
	Kind    string `json:"kind"` // "standard" | "distributed"
	MAC     string `json:"mac"`
	Type    string `json:"type"`
}

type vmInfo struct {
	Name       string     `json:"name"`
	Moref      string     `json:"moref"`
	Datacenter string     `json:"datacenter"`
	Path       string     `json:"path"` // inventory path /DC0/vm/Folder1/vm-0001
	Host       string     `json:"host"`
	Cluster    string     `json:"cluster"`
	Datastore  string     `json:"datastore"`
	GuestID    string     `json:"guest_id"`
	GuestName  string     `json:"guest_full_name"`
	Windows    bool       `json:"windows"`
	Tools      string     `json:"tools"`
	PowerState string     `json:"power_state"`
	IP         string     `json:"ip"`
	HostName   string     `json:"host_name"`
	Data       bool       `json:"data"`
	Disks      []diskInfo `json:"disks"`
	Nics       []nicInfo  `json:"nics"`

	ref types.ManagedObjectReference
}

type inventory struct {
	client          *vim25.Client
	datastoreDirs   map[string]string // datastore name -> local folder
	datastoreDCs    map[string]string
	datacenterNames []string
	vms             []*vmInfo
	byRef           map[string]*vmInfo
	manifestPath    string
	cbt             *cbtState
	mu              sync.Mutex
}

func (inv *inventory) dataVMNames() []string {
	out := []string{}
	for _, v := range inv.vms {
		if v.Data {
			out = append(out, v.Name)
		}
	}
	return out
}

func (inv *inventory) vm(ref types.ManagedObjectReference) *vmInfo {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	return inv.byRef[ref.Value]
}

// resolveDatastorePath maps "[ds] dir/file" to a local path.
func (inv *inventory) resolveDatastorePath(p string) (string, bool) {
	var dp object.DatastorePath
	if !dp.FromString(p) {
		return "", false
	}
	dir, ok := inv.datastoreDirs[dp.Datastore]
	if !ok {
		return "", false
	}
	return filepath.Join(dir, filepath.FromSlash(dp.Path)), true
}

func entityName(ref types.ManagedObjectReference) string {
	if e, ok := simulator.Map.Get(ref).(mo.Entity); ok {
		return e.Entity().Name
	}
	return ""
}

func datacenterOf(e mo.Entity) *simulator.Datacenter {
	for e != nil {
		if dc, ok := e.(*simulator.Datacenter); ok {
			return dc
		}
		p := e.Entity().Parent
		if p == nil {
			return nil
		}
		next, _ := simulator.Map.Get(*p).(mo.Entity)
		e = next
	}
	return nil
}

type dcNet struct {
	name    string
	kind    string // "standard" | "distributed"
	backing func() types.BaseVirtualDeviceBackingInfo
}

type dcHost struct {
	host    *simulator.HostSystem
	pool    types.ManagedObjectReference
	cluster string
}

func buildInventory(ctx context.Context, c *vim25.Client, o *options, root string) (*inventory, error) {
	inv := &inventory{
		client:        c,
		datastoreDirs: map[string]string{},
		datastoreDCs:  map[string]string{},
		byRef:         map[string]*vmInfo{},
	}

	var dcs []*simulator.Datacenter
	for _, e := range simulator.Map.All("Datacenter") {
		dcs = append(dcs, e.(*simulator.Datacenter))
	}
	sort.Slice(dcs, func(i, j int) bool { return dcs[i].Name < dcs[j].Name })

	hostsByDC := map[string][]dcHost{}
	for _, e := range simulator.Map.All("HostSystem") {
		h := e.(*simulator.HostSystem)
		dc := datacenterOf(h)
		if dc == nil {
			continue
		}
		var pool types.ManagedObjectReference
		cluster := ""
		switch cr := simulator.Map.Get(*h.Parent).(type) {
		case *simulator.ClusterComputeResource:
			pool = *cr.ResourcePool
			cluster = cr.Name
		case *mo.ComputeResource:
			pool = *cr.ResourcePool
		default:
			return nil, fmt.Errorf("host %s: unexpected parent %T", h.Name, cr)
		}
		hostsByDC[dc.Name] = append(hostsByDC[dc.Name], dcHost{h, pool, cluster})
	}
	for _, hs := range hostsByDC {
		sort.Slice(hs, func(i, j int) bool { return hs[i].host.Name < hs[j].host.Name })
	}

	type dcState struct {
		dc         *simulator.Datacenter
		hosts      []dcHost
		datastores []string
		nets       []dcNet
		folders    []*object.Folder
		folderPath []string
	}
	var states []*dcState

	dsN := 0
	for _, dc := range dcs {
		st := &dcState{dc: dc, hosts: hostsByDC[dc.Name]}
		inv.datacenterNames = append(inv.datacenterNames, dc.Name)
		if len(st.hosts) == 0 {
			return nil, fmt.Errorf("datacenter %s has no hosts", dc.Name)
		}

		// Datastores: created on the first host, mounted on all hosts of the datacenter.
		for k := 0; k < o.datastores; k++ {
			name := fmt.Sprintf("LocalDS_%d", dsN)
			dsN++
			dir := filepath.Join(root, name)
			if err := os.RemoveAll(dir); err != nil {
				return nil, err
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			first := object.NewHostSystem(c, st.hosts[0].host.Reference())
			dss, err := first.ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return nil, err
			}
			dsObj, err := dss.CreateLocalDatastore(ctx, name, dir)
			if err != nil {
				return nil, fmt.Errorf("datastore %s: %w", name, err)
			}
			ds := simulator.Map.Get(dsObj.Reference()).(*simulator.Datastore)
			for _, h := range st.hosts[1:] {
				hs := h.host
				hdss := simulator.Map.Get(*hs.ConfigManager.DatastoreSystem).(*simulator.HostDatastoreSystem)
				hdss.Datastore = append(hdss.Datastore, ds.Self)
				hs.Datastore = hdss.Datastore
				switch cr := simulator.Map.Get(*hs.Parent).(type) {
				case *simulator.ClusterComputeResource:
					if simulator.FindReference(cr.Datastore, ds.Self) == nil {
						cr.Datastore = append(cr.Datastore, ds.Self)
					}
				case *mo.ComputeResource:
					if simulator.FindReference(cr.Datastore, ds.Self) == nil {
						cr.Datastore = append(cr.Datastore, ds.Self)
					}
				}
				ds.Host = append(ds.Host, types.DatastoreHostMount{
					Key: hs.Self,
					MountInfo: types.HostMountInfo{
						Path:       dir,
						AccessMode: string(types.HostMountModeReadWrite),
						Mounted:    types.NewBool(true),
						Accessible: types.NewBool(true),
					},
				})
			}
			// Capacity/free space of the real filesystem.
			ds.Summary.Type = "VMFS"
			st.datastores = append(st.datastores, name)
			inv.datastoreDirs[name] = dir
			inv.datastoreDCs[name] = dc.Name
		}

		// Standard port groups (VM Network exists already).
		st.nets = append(st.nets, dcNet{name: "VM Network", kind: "standard"})
		for k := 0; k < o.networks; k++ {
			name := fmt.Sprintf("VLAN-%d", 100+k)
			for _, h := range st.hosts {
				ns := simulator.Map.Get(*h.host.ConfigManager.NetworkSystem).(*simulator.HostNetworkSystem)
				nso := object.NewHostNetworkSystem(c, ns.Reference())
				err := nso.AddPortGroup(ctx, types.HostPortGroupSpec{
					Name:        name,
					VlanId:      int32(100 + k),
					VswitchName: "vSwitch0",
					Policy:      types.HostNetworkPolicy{},
				})
				if err != nil {
					if soap.IsSoapFault(err) {
						if _, dup := soap.ToSoapFault(err).VimFault().(*types.DuplicateName); dup {
							continue // the Network object exists already (added via the first host)
						}
					}
					return nil, fmt.Errorf("port group %s on %s: %w", name, h.host.Name, err)
				}
			}
			st.nets = append(st.nets, dcNet{name: name, kind: "standard"})
		}
		// Every host sees every network of its datacenter.
		var netRefs []types.ManagedObjectReference
		for _, ref := range dc.Network {
			if ref.Type == "Network" {
				netRefs = append(netRefs, ref)
			}
		}
		for _, h := range st.hosts {
			for _, ref := range netRefs {
				if simulator.FindReference(h.host.Network, ref) == nil {
					h.host.Network = append(h.host.Network, ref)
				}
			}
		}
		// Distributed port groups (uplink port groups excluded).
		for _, ref := range dc.Network {
			if ref.Type != "DistributedVirtualPortgroup" {
				continue
			}
			pg := simulator.Map.Get(ref).(*simulator.DistributedVirtualPortgroup)
			if strings.Contains(pg.Name, "DVUplinks") {
				continue
			}
			dvs := simulator.Map.Get(*pg.Config.DistributedVirtualSwitch).(*simulator.DistributedVirtualSwitch)
			key, uuid := pg.Key, dvs.Uuid
			st.nets = append(st.nets, dcNet{name: pg.Name, kind: "distributed", backing: func() types.BaseVirtualDeviceBackingInfo {
				return &types.VirtualEthernetCardDistributedVirtualPortBackingInfo{
					Port: types.DistributedVirtualSwitchPortConnection{PortgroupKey: key, SwitchUuid: uuid},
				}
			}})
		}

		// VM folders: vm/, vm/Folder1, vm/Folder1/Nested1, vm/Folder2
		vmFolder := object.NewFolder(c, dc.VmFolder)
		f1, err := vmFolder.CreateFolder(ctx, "Folder1")
		if err != nil {
			return nil, err
		}
		f1n, err := f1.CreateFolder(ctx, "Nested1")
		if err != nil {
			return nil, err
		}
		f2, err := vmFolder.CreateFolder(ctx, "Folder2")
		if err != nil {
			return nil, err
		}
		st.folders = []*object.Folder{vmFolder, f1, f1n, f2}
		st.folderPath = []string{"", "Folder1", "Folder1/Nested1", "Folder2"}
		states = append(states, st)
	}

	width := len(fmt.Sprint(o.vms - 1))
	if width < 4 {
		width = 4
	}

	// Create the VMs. The simulator locks per object (folder, pool, host), so a few
	// workers overlap well; names, paths and disks do not depend on the order.
	infos := make([]*vmInfo, o.vms)
	type created struct {
		i   int
		err error
	}
	work := make(chan int)
	results := make(chan created, o.vms)
	var cwg sync.WaitGroup
	workers := runtime.NumCPU()
	if w, err := strconv.Atoi(os.Getenv("VCSIM_WORKERS")); err == nil && w > 0 {
		workers = w
	}
	if workers > 4 {
		workers = 4
	}
	for w := 0; w < workers; w++ {
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			for i := range work {
				st := states[i%len(states)]
				j := i / len(states) // index within the datacenter
				h := st.hosts[j%len(st.hosts)]
				dsName := st.datastores[j%len(st.datastores)]
				g := guestOSes[i%len(guestOSes)]
				name := fmt.Sprintf("%s%0*d", o.vmPrefix, width, i)
				fi := j % len(st.folders)

				info := &vmInfo{
					Name:       name,
					Datacenter: st.dc.Name,
					Host:       h.host.Name,
					Cluster:    h.cluster,
					Datastore:  dsName,
					GuestID:    g.id,
					GuestName:  g.full,
					Windows:    g.windows,
					Tools:      toolsFlavour(i),
					PowerState: string(powerStateFor(i)),
					IP:         fmt.Sprintf("10.%d.%d.%d", 10+i%len(states), (j/200)%250, 10+j%200),
					HostName:   strings.ToLower(strings.ReplaceAll(name, "_", "-")),
					Data:       i < o.dataVMs,
				}
				p := []string{"", st.dc.Name, "vm"}
				if st.folderPath[fi] != "" {
					p = append(p, st.folderPath[fi])
				}
				info.Path = strings.Join(append(p, name), "/")

				err := func() error {
					spec := vmSpec(o, i, info, st.nets, dsName)
					task, err := st.folders[fi].CreateVM(ctx, spec, object.NewResourcePool(c, h.pool), object.NewHostSystem(c, h.host.Reference()))
					if err != nil {
						return fmt.Errorf("create %s: %w", name, err)
					}
					res, err := task.WaitForResult(ctx, nil)
					if err != nil {
						return fmt.Errorf("create %s: %w", name, err)
					}
					info.ref = res.Result.(types.ManagedObjectReference)
					info.Moref = info.ref.Value
					vm := simulator.Map.Get(info.ref).(*simulator.VirtualMachine)
					var ferr error
					simulator.Map.WithLock(vm, func() { ferr = finishVM(vm, info, o, inv) })
					if ferr != nil {
						return fmt.Errorf("%s: %w", name, ferr)
					}
					return nil
				}()
				infos[i] = info
				results <- created{i, err}
			}
		}()
	}
	go func() {
		for i := 0; i < o.vms; i++ {
			work <- i
		}
		close(work)
	}()
	var firstErr error
	for n := 0; n < o.vms; n++ {
		if r := <-results; r.err != nil && firstErr == nil {
			firstErr = r.err
		}
	}
	cwg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	for _, info := range infos {
		inv.vms = append(inv.vms, info)
		inv.byRef[info.Moref] = info
	}

	// Fill data VMs in parallel.
	type job struct {
		path string
		size int64
		seed int64
	}
	var jobs []job
	for _, v := range inv.vms {
		if !v.Data {
			continue
		}
		for _, d := range v.Disks {
			hsh := fnv.New64a()
			fmt.Fprintf(hsh, "%d/%s/%d", o.seed, v.Name, d.Index)
			jobs = append(jobs, job{d.Path, d.Capacity, int64(hsh.Sum64() >> 1)})
		}
	}
	ch := make(chan job)
	errs := make(chan error, len(jobs)+1)
	var wg sync.WaitGroup
	for w := 0; w < runtime.NumCPU(); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				if err := fillPattern(j.path, j.size, j.seed); err != nil {
					errs <- err
				}
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}

	inv.manifestPath = filepath.Join(root, "inventory.json")
	manifest := map[string]interface{}{
		"datacenters": inv.datacenterNames,
		"datastores":  inv.datastoreDirs,
		"vms":         inv.vms,
	}
	data, _ := json.MarshalIndent(manifest, "", " ")
	if err := ioutil.WriteFile(inv.manifestPath, data, 0o644); err != nil {
		return nil, err
	}
	return inv, nil
}

func diskCapacity(o *options, idx int) int64 {
	if idx < len(o.diskSizes) {
		return o.diskSizes[idx]
	}
	return o.diskSizes[len(o.diskSizes)-1]
}

func diskFileName(vm string, idx int) string {
	if idx == 0 {
		return vm + ".vmdk"
	}
	return fmt.Sprintf("%s_%d.vmdk", vm, idx)
}

// vmSpec builds the CreateVM spec: SCSI controller(s) 1000+, disks 2000+ (key = 2000 +
// 16*bus + unit, unit 7 skipped), a CD-ROM, and 1-2 NICs 4000+ on varying networks.
func vmSpec(o *options, i int, info *vmInfo, netList []dcNet, dsName string) types.VirtualMachineConfigSpec {
	name := info.Name
	g := guestOSes[i%len(guestOSes)]
	cpus, mem := int32(2), int64(2048)
	if g.windows {
		cpus, mem = 4, 8192
	}
	if i%3 == 1 {
		cpus, mem = cpus/2, mem/2
	}
	firmware := string(types.GuestOsDescriptorFirmwareTypeBios)
	if g.windows {
		firmware = string(types.GuestOsDescriptorFirmwareTypeEfi)
	}
	spec := types.VirtualMachineConfigSpec{
		Name:                  name,
		GuestId:               g.id,
		NumCPUs:               cpus,
		NumCoresPerSocket:     1,
		MemoryMB:              mem,
		Firmware:              firmware,
		Annotation:            fmt.Sprintf("test lab VM %d", i),
		ChangeTrackingEnabled: types.NewBool(false),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", dsName)},
	}
	var devs []types.BaseVirtualDeviceConfigSpec
	add := func(d types.BaseVirtualDevice, fileOp types.VirtualDeviceConfigSpecFileOperation) {
		devs = append(devs, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: fileOp,
			Device:        d,
		})
	}
	nctrl := (o.disks + 14) / 15
	if nctrl == 0 {
		nctrl = 1
	}
	for b := 0; b < nctrl; b++ {
		base := types.VirtualSCSIController{
			VirtualController: types.VirtualController{
				VirtualDevice: types.VirtualDevice{
					Key:           int32(1000 + b),
					ControllerKey: 100,
					UnitNumber:    types.NewInt32(int32(3 + b)),
					DeviceInfo:    &types.Description{Label: fmt.Sprintf("SCSI controller %d", b)},
				},
				BusNumber: int32(b),
			},
			SharedBus:          types.VirtualSCSISharingNoSharing,
			ScsiCtlrUnitNumber: 7,
		}
		if g.windows {
			add(&types.VirtualLsiLogicSASController{VirtualSCSIController: base}, "")
		} else {
			add(&types.ParaVirtualSCSIController{VirtualSCSIController: base}, "")
		}
	}
	add(&types.VirtualCdrom{VirtualDevice: types.VirtualDevice{
		Key:           3000,
		ControllerKey: 200,
		UnitNumber:    types.NewInt32(0),
		Backing: &types.VirtualCdromRemotePassthroughBackingInfo{
			VirtualDeviceRemoteDeviceBackingInfo: types.VirtualDeviceRemoteDeviceBackingInfo{DeviceName: "", UseAutoDetect: types.NewBool(false)},
		},
		Connectable: &types.VirtualDeviceConnectInfo{AllowGuestControl: true, Status: "untried"},
	}}, "")

	for d := 0; d < o.disks; d++ {
		bus := d / 15
		unit := d % 15
		if unit >= 7 {
			unit++
		}
		capacity := diskCapacity(o, d)
		thin := (i+d)%2 == 1
		fileName := fmt.Sprintf("[%s] %s", dsName, path.Join(name, diskFileName(name, d)))
		hsh := fnv.New64a()
		fmt.Fprintf(hsh, "%s/%d", name, d)
		u := hsh.Sum64()
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(2000 + 16*bus + unit),
				ControllerKey: int32(1000 + bus),
				UnitNumber:    types.NewInt32(int32(unit)),
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Hard disk %d", d+1)},
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: fileName},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(thin),
					EagerlyScrub:                 types.NewBool(false),
					WriteThrough:                 types.NewBool(false),
					Split:                        types.NewBool(false),
					DigestEnabled:                types.NewBool(false),
					Sharing:                      "sharingNone",
					Uuid: fmt.Sprintf("6000C29%01x-%04x-%04x-%04x-%012x",
						u>>60, (u>>44)&0xffff, (u>>28)&0xffff, (u>>12)&0xffff, (u*2654435761)&0xffffffffffff),
				},
			},
			CapacityInKB:    capacity / 1024,
			CapacityInBytes: capacity,
		}
		add(disk, types.VirtualDeviceConfigSpecFileOperationCreate)
		info.Disks = append(info.Disks, diskInfo{
			Key: disk.Key, Index: d, Controller: disk.ControllerKey, Unit: int32(unit),
			FileName: fileName, Capacity: capacity, Thin: thin,
		})
	}

	nnics := 1
	if i%3 == 0 {
		nnics = 2
	}
	for k := 0; k < nnics; k++ {
		n := netList[(i+k)%len(netList)]
		var backing types.BaseVirtualDeviceBackingInfo
		if n.kind == "distributed" {
			backing = n.backing()
		} else {
			backing = &types.VirtualEthernetCardNetworkBackingInfo{
				VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: n.name, UseAutoDetect: types.NewBool(false)},
			}
		}
		mac := fmt.Sprintf("00:50:56:%02x:%02x:%02x", (i>>12)&0x3f, (i>>4)&0xff, ((i&0xf)<<4)|k)
		card := types.VirtualEthernetCard{
			VirtualDevice: types.VirtualDevice{
				Key:           int32(4000 + k),
				ControllerKey: 100,
				UnitNumber:    types.NewInt32(int32(7 + k)),
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Network adapter %d", k+1)},
				Backing:       backing,
				Connectable:   &types.VirtualDeviceConnectInfo{StartConnected: true, AllowGuestControl: true, Connected: true, Status: "ok"},
			},
			AddressType:      string(types.VirtualEthernetCardMacTypeAssigned),
			MacAddress:       mac,
			WakeOnLanEnabled: types.NewBool(true),
		}
		var dev types.BaseVirtualDevice
		typ := "vmxnet3"
		if g.windows && k == 1 {
			dev = &types.VirtualE1000e{VirtualEthernetCard: card}
			typ = "e1000e"
		} else {
			dev = &types.VirtualVmxnet3{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: card}}
		}
		add(dev, "")
		info.Nics = append(info.Nics, nicInfo{Key: card.Key, Network: n.name, Kind: n.kind, MAC: mac, Type: typ})
	}
	spec.DeviceChange = devs
	return spec
}

// finishVM turns the created (empty) disk files into sparse raw images of the right size,
// and sets power state, guest and tools information. Runs before the server listens.
func finishVM(vm *simulator.VirtualMachine, info *vmInfo, o *options, inv *inventory) error {
	for k := range info.Disks {
		d := &info.Disks[k]
		local, ok := inv.resolveDatastorePath(d.FileName)
		if !ok {
			return fmt.Errorf("cannot resolve %s", d.FileName)
		}
		d.Path = local
		if err := os.Truncate(local, d.Capacity); err != nil {
			return err
		}
		linkFlat(local)
	}
	vm.Config.GuestFullName = info.GuestName
	vm.Summary.Config.GuestFullName = info.GuestName
	vm.Summary.Config.Annotation = vm.Config.Annotation
	vm.Config.Tools = &types.ToolsConfigInfo{ToolsVersion: 11365, SyncTimeWithHost: types.NewBool(false)}
	if info.Tools == "old" {
		vm.Config.Tools.ToolsVersion = 10346
	}
	if info.Tools == "none" {
		vm.Config.Tools.ToolsVersion = 0
	}
	state := types.VirtualMachinePowerState(info.PowerState)
	vm.Runtime.PowerState = state
	vm.Summary.Runtime.PowerState = state
	if state == types.VirtualMachinePowerStatePoweredOn {
		boot := time.Now().Add(-time.Hour)
		vm.Runtime.BootTime = &boot
		vm.Summary.Runtime.BootTime = &boot
	}
	for _, c := range guestChanges(vm, info) {
		mo.ApplyPropertyChange(&vm.VirtualMachine, []types.PropertyChange{c})
	}
	return nil
}

// guestChanges computes guest/tools properties for the VM's current power state.
func guestChanges(vm *simulator.VirtualMachine, info *vmInfo) []types.PropertyChange {
	running := vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn && info.Tools != "none"
	g := &types.GuestInfo{
		GuestId:       info.GuestID,
		GuestFullName: info.GuestName,
		GuestFamily:   "linuxGuest",
		GuestState:    "notRunning",
		ToolsVersion:  "0",
	}
	if info.Windows {
		g.GuestFamily = "windowsGuest"
	}
	switch info.Tools {
	case "none":
		g.ToolsStatus = types.VirtualMachineToolsStatusToolsNotInstalled
		g.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
		g.ToolsVersionStatus2 = string(types.VirtualMachineToolsVersionStatusGuestToolsNotInstalled)
	case "old":
		g.ToolsVersion = "10346"
		g.ToolsVersionStatus2 = string(types.VirtualMachineToolsVersionStatusGuestToolsSupportedOld)
	default:
		g.ToolsVersion = "11365"
		g.ToolsVersionStatus2 = string(types.VirtualMachineToolsVersionStatusGuestToolsCurrent)
	}
	if info.Tools != "none" {
		if running {
			g.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			if info.Tools == "old" {
				g.ToolsStatus = types.VirtualMachineToolsStatusToolsOld
			} else {
				g.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
			}
		} else {
			g.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
			g.ToolsStatus = types.VirtualMachineToolsStatusToolsNotRunning
		}
	}
	if running {
		g.GuestState = "running"
		g.HostName = info.HostName
		g.IpAddress = info.IP
		for k, n := range info.Nics {
			nic := types.GuestNicInfo{
				Network:        n.Network,
				MacAddress:     n.MAC,
				Connected:      true,
				DeviceConfigId: n.Key,
			}
			if k == 0 {
				nic.IpAddress = []string{info.IP}
				nic.IpConfig = &types.NetIpConfigInfo{IpAddress: []types.NetIpConfigInfoIpAddress{{
					IpAddress: info.IP, PrefixLength: 24, State: "preferred",
				}}}
			}
			g.Net = append(g.Net, nic)
		}
		for k, d := range info.Disks {
			p := "/"
			if k > 0 {
				p = fmt.Sprintf("/data%d", k)
			}
			if info.Windows {
				p = fmt.Sprintf("%c:\\", 'C'+k)
			}
			g.Disk = append(g.Disk, types.GuestDiskInfo{DiskPath: p, Capacity: d.Capacity, FreeSpace: d.Capacity / 2})
		}
	}
	summary := &types.VirtualMachineGuestSummary{
		GuestId:             g.GuestId,
		GuestFullName:       g.GuestFullName,
		ToolsStatus:         g.ToolsStatus,
		ToolsVersionStatus2: g.ToolsVersionStatus2,
		ToolsRunningStatus:  g.ToolsRunningStatus,
		HostName:            g.HostName,
		IpAddress:           g.IpAddress,
	}
	heartbeat := types.ManagedEntityStatusGray
	if running {
		heartbeat = types.ManagedEntityStatusGreen
	}
	return []types.PropertyChange{
		{Name: "guest", Val: g},
		{Name: "summary.guest", Val: summary},
		{Name: "guestHeartbeatStatus", Val: heartbeat},
		{Name: "summary.quickStats.guestHeartbeatStatus", Val: heartbeat},
	}
}
