package main

// Changed Block Tracking, exact, on real sparse raw files.
//
// Per VM we watch config.changeTrackingEnabled. While it is on, every disk has a CBT
// identity (a uuid, new on every off->on transition and on a capacity change) and a
// sequence number. CreateSnapshot freezes a sparse copy of every disk
// ("<disk>-snap-<n>.vmdk" next to the base file; a hard link in a hidden store at
// <root>/.cbt-store keeps it alive after the snapshot is removed), bumps the sequence
// and stores the block-granular diff between the previous frozen copy and the new one.
// The snapshot's config.hardware.device shows the frozen file and changeId
// "<identity>/<seq>". QueryChangedDiskAreas(changeId=<identity>/<s>) against a snapshot
// with sequence t answers the union of the stored diffs s+1..t (exactly the blocks that
// differ between consecutive frozen copies); changeId "*" answers the data extents
// (SEEK_DATA/SEEK_HOLE) of the snapshot's frozen copy, rounded to the CBT block size.
// Only the newest frozen copy per disk (plus those of existing snapshots) is kept on
// disk, so every change id of the current identity stays valid, as on vSphere.

import (
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type diskCBT struct {
	key      int32
	identity string
	seq      int
	capacity int64
	history  map[int][]extent // seq n -> blocks that changed between frozen copies n-1 and n
	baseline string           // hidden frozen copy for seq (newest)
}

type snapDisk struct {
	key      int32
	visible  string // <ds>/<vm>/<disk>-snap-<n>.vmdk
	hidden   string // hard link in the CBT store ("" when CBT was off)
	capacity int64
	identity string
	seq      int
}

type snapCBT struct {
	ref   types.ManagedObjectReference
	n     int
	disks map[int32]*snapDisk
}

type vmCBT struct {
	mu      sync.Mutex
	ref     types.ManagedObjectReference
	enabled bool
	disks   map[int32]*diskCBT
	snaps   map[string]*snapCBT
	nsnap   int
}

type cbtState struct {
	o     *options
	inv   *inventory
	store string
	mu    sync.Mutex
	vms   map[string]*vmCBT
}

func newCBT(o *options, root string, inv *inventory) *cbtState {
	store := filepath.Join(root, ".cbt-store")
	os.RemoveAll(store)
	os.MkdirAll(store, 0o755)
	return &cbtState{o: o, inv: inv, store: store, vms: map[string]*vmCBT{}}
}

func (c *cbtState) get(ref types.ManagedObjectReference) *vmCBT {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.vms[ref.Value]
	if v == nil {
		v = &vmCBT{ref: ref, disks: map[int32]*diskCBT{}, snaps: map[string]*snapCBT{}}
		c.vms[ref.Value] = v
	}
	return v
}

func (c *cbtState) newIdentity() string {
	if c.o.changeIDFormat == "uuid" {
		return uuid.New().String()
	}
	var b [16]byte
	rand.Read(b[:])
	b[0] = 0x52
	parts := make([]string, 16)
	for i := range b {
		parts[i] = fmt.Sprintf("%02x", b[i])
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

type liveDisk struct {
	key      int32
	fileName string
	path     string
	capacity int64
	// untracked: the VM's extraConfig turns change tracking off for this disk alone
	// ("scsi<bus>:<unit>.ctkEnabled" = "false"), as vSphere allows per disk.
	untracked bool
}

type vmView struct {
	name    string
	enabled bool
	disks   []liveDisk
	devices []types.BaseVirtualDevice
}

func diskCapacityOf(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// readVM copies what CBT needs from the simulator's VM object (under its lock).
func (c *cbtState) readVM(ref types.ManagedObjectReference) (*vmView, bool) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, false
	}
	view := &vmView{}
	ctkOff := map[string]bool{}
	simulator.Map.WithLock(vm, func() {
		view.name = vm.Name
		if vm.Config == nil {
			return
		}
		view.enabled = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		view.devices = append([]types.BaseVirtualDevice(nil), vm.Config.Hardware.Device...)
		for _, opt := range vm.Config.ExtraConfig {
			o := opt.GetOptionValue()
			if value, ok := o.Value.(string); ok && strings.HasSuffix(o.Key, ".ctkEnabled") {
				ctkOff[strings.TrimSuffix(o.Key, ".ctkEnabled")] = strings.EqualFold(value, "false")
			}
		}
	})
	for _, dev := range view.devices {
		d, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		fb, ok := d.Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue
		}
		name := fb.GetVirtualDeviceFileBackingInfo().FileName
		local, _ := c.inv.resolveDatastorePath(name)
		unit := int32(0)
		if d.UnitNumber != nil {
			unit = *d.UnitNumber
		}
		untracked := ctkOff[fmt.Sprintf("scsi%d:%d", d.ControllerKey-1000, unit)]
		view.disks = append(view.disks, liveDisk{key: d.Key, fileName: name, path: local, capacity: diskCapacityOf(d),
			untracked: untracked})
	}
	return view, true
}

// ensureDiskFiles makes every disk of the VM a raw file of at least its capacity
// (disks added by CreateVM/ReconfigVM start as empty files; grown disks are extended).
func (c *cbtState) ensureDiskFiles(view *vmView) {
	for _, d := range view.disks {
		if d.path == "" {
			continue
		}
		st, err := os.Stat(d.path)
		if err != nil {
			continue
		}
		if st.Size() < d.capacity {
			if err := os.Truncate(d.path, d.capacity); err != nil {
				log.Printf("grow %s: %s", d.path, err)
			}
		}
		linkFlat(d.path)
	}
}

// linkFlat makes "<disk>-flat.vmdk" a hard link to the raw "<disk>.vmdk": the simulator
// insists on the -flat file for disk edits (vdmCreateVirtualDisk), and like on ESXi the
// -flat file then holds the data.
func linkFlat(p string) {
	if !strings.HasSuffix(p, ".vmdk") {
		return
	}
	flat := strings.TrimSuffix(p, ".vmdk") + "-flat.vmdk"
	if os.SameFile(statOrNil(p), statOrNil(flat)) {
		return
	}
	os.Remove(flat)
	if err := os.Link(p, flat); err != nil {
		log.Printf("link %s: %s", flat, err)
	}
}

func statOrNil(p string) os.FileInfo {
	st, err := os.Stat(p)
	if err != nil {
		return nil
	}
	return st
}

func (c *cbtState) referenced(v *vmCBT, p string) bool {
	if p == "" {
		return true
	}
	for _, d := range v.disks {
		if d.baseline == p {
			return true
		}
	}
	for _, s := range v.snaps {
		for _, sd := range s.disks {
			if sd.hidden == p {
				return true
			}
		}
	}
	return false
}

func (c *cbtState) removeIfUnreferenced(v *vmCBT, p string) {
	if p != "" && !c.referenced(v, p) {
		os.Remove(p)
	}
}

// syncLocked applies CBT on/off transitions and per-disk identity resets.
func (c *cbtState) syncLocked(v *vmCBT, view *vmView) {
	drop := func(key int32) {
		d := v.disks[key]
		delete(v.disks, key)
		if d != nil {
			c.removeIfUnreferenced(v, d.baseline)
		}
	}
	if !view.enabled || !v.enabled {
		for key := range v.disks {
			drop(key)
		}
	}
	v.enabled = view.enabled
	if !view.enabled {
		return
	}
	present := map[int32]bool{}
	for _, ld := range view.disks {
		if ld.untracked { // dropped below: tracked again later, it starts a new CBT identity
			continue
		}
		present[ld.key] = true
		d := v.disks[ld.key]
		if d != nil && d.capacity == ld.capacity {
			continue
		}
		if d != nil {
			drop(ld.key)
		}
		v.disks[ld.key] = &diskCBT{key: ld.key, identity: c.newIdentity(), capacity: ld.capacity, history: map[int][]extent{}}
	}
	for key := range v.disks {
		if !present[key] {
			drop(key)
		}
	}
}

// afterReconfig runs after a successful ReconfigVM_Task / CreateVM_Task.
func (c *cbtState) afterReconfig(ref types.ManagedObjectReference) {
	view, ok := c.readVM(ref)
	if !ok {
		return
	}
	c.ensureDiskFiles(view)
	v := c.get(ref)
	v.mu.Lock()
	defer v.mu.Unlock()
	c.syncLocked(v, view)
}

func snapFileName(base string, n int) string {
	return fmt.Sprintf("%s-snap-%d.vmdk", strings.TrimSuffix(base, ".vmdk"), n)
}

// afterCreateSnapshot freezes the disks for the new snapshot and rewrites its config.
func (c *cbtState) afterCreateSnapshot(vmRef, snapRef types.ManagedObjectReference) error {
	view, ok := c.readVM(vmRef)
	if !ok {
		return fmt.Errorf("vm %s not found", vmRef)
	}
	v := c.get(vmRef)
	v.mu.Lock()
	defer v.mu.Unlock()
	c.syncLocked(v, view)
	v.nsnap++
	s := &snapCBT{ref: snapRef, n: v.nsnap, disks: map[int32]*snapDisk{}}
	devices := make([]types.BaseVirtualDevice, len(view.devices))
	for i, dev := range view.devices {
		devices[i] = dev
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		live, ok := c.inv.resolveDatastorePath(b.FileName)
		if !ok {
			continue
		}
		visibleName := snapFileName(b.FileName, s.n)
		visible, _ := c.inv.resolveDatastorePath(visibleName)
		os.Remove(visible)
		if err := sparseCopy(live, visible); err != nil {
			return fmt.Errorf("freeze %s: %w", live, err)
		}
		sd := &snapDisk{key: disk.Key, visible: visible, capacity: diskCapacityOf(disk)}
		changeID := ""
		if d := v.disks[disk.Key]; view.enabled && d != nil {
			d.seq++
			dir := filepath.Join(c.store, vmRef.Value, strconv.Itoa(int(disk.Key)))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			hidden := filepath.Join(dir, fmt.Sprintf("%s-%d.raw", strings.NewReplacer(" ", "", "-", "").Replace(d.identity)[:12], d.seq))
			os.Remove(hidden)
			if err := os.Link(visible, hidden); err != nil {
				if err := sparseCopy(visible, hidden); err != nil {
					return err
				}
			}
			if d.baseline != "" {
				diff, err := diffBlocks(d.baseline, hidden, c.o.cbtBlock)
				if err != nil {
					return fmt.Errorf("diff %s: %w", hidden, err)
				}
				d.history[d.seq] = diff
			} else {
				d.history[d.seq] = nil
			}
			old := d.baseline
			d.baseline = hidden
			c.removeIfUnreferenced(v, old)
			sd.hidden, sd.identity, sd.seq = hidden, d.identity, d.seq
			changeID = fmt.Sprintf("%s/%d", d.identity, d.seq)
		}
		s.disks[disk.Key] = sd
		nd := *disk
		nb := *b
		nb.FileName = visibleName
		nb.ChangeId = changeID
		nd.Backing = &nb
		devices[i] = &nd
	}
	v.snaps[snapRef.Value] = s

	snap, ok := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return fmt.Errorf("snapshot %s vanished", snapRef)
	}
	simulator.Map.WithLock(snap, func() {
		snap.Config.Hardware.Device = devices
		simulator.Map.Update(snap, []types.PropertyChange{{Name: "config.hardware.device", Val: devices}})
	})
	return nil
}

// reconcile drops state of snapshots (or VMs) that no longer exist.
func (c *cbtState) reconcile(vmRef types.ManagedObjectReference) {
	v := c.get(vmRef)
	v.mu.Lock()
	defer v.mu.Unlock()
	if simulator.Map.Get(vmRef) == nil {
		for _, s := range v.snaps {
			for _, sd := range s.disks {
				os.Remove(sd.visible)
			}
		}
		os.RemoveAll(filepath.Join(c.store, vmRef.Value))
		v.snaps = map[string]*snapCBT{}
		v.disks = map[int32]*diskCBT{}
		v.enabled = false
		return
	}
	// A snapshot is gone when it is no longer in the VM's snapshot tree (RemoveSnapshot
	// with removeChildren=true leaves the children in the simulator's registry).
	live := map[string]bool{}
	if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
		simulator.Map.WithLock(vm, func() {
			if vm.Snapshot != nil {
				var walk func([]types.VirtualMachineSnapshotTree)
				walk = func(tree []types.VirtualMachineSnapshotTree) {
					for _, t := range tree {
						live[t.Snapshot.Value] = true
						walk(t.ChildSnapshotList)
					}
				}
				walk(vm.Snapshot.RootSnapshotList)
			}
		})
	}
	var gone []*snapCBT
	for key, s := range v.snaps {
		if !live[key] || simulator.Map.Get(s.ref) == nil {
			gone = append(gone, s)
			delete(v.snaps, key)
		}
	}
	for _, s := range gone {
		for _, sd := range s.disks {
			os.Remove(sd.visible)
			c.removeIfUnreferenced(v, sd.hidden)
		}
	}
}

type cbtFault struct {
	msg   string
	fault types.BaseMethodFault
}

func invalidArg(prop string) *cbtFault {
	return &cbtFault{"A specified parameter was not correct: " + prop, &types.InvalidArgument{InvalidProperty: prop}}
}

// query answers QueryChangedDiskAreas.
func (c *cbtState) query(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *cbtFault) {
	view, ok := c.readVM(req.This)
	if !ok {
		return nil, &cbtFault{"The object has already been deleted or has not been completely created", &types.ManagedObjectNotFound{Obj: req.This}}
	}
	v := c.get(req.This)
	v.mu.Lock()
	defer v.mu.Unlock()
	c.syncLocked(v, view)

	var live *liveDisk
	for i := range view.disks {
		if view.disks[i].key == req.DeviceKey {
			live = &view.disks[i]
		}
	}
	if !view.enabled {
		file := "[] " + view.name
		if live != nil {
			file = live.fileName
		}
		return nil, &cbtFault{
			fmt.Sprintf("Error caused by file %s: changed block tracking is not enabled for virtual machine %s", file, view.name),
			&types.FileFault{File: file},
		}
	}
	if req.StartOffset < 0 {
		return nil, invalidArg("startOffset")
	}

	var target string
	var capacity int64
	var targetSeq int
	var targetIdentity string
	if req.Snapshot != nil {
		s := v.snaps[req.Snapshot.Value]
		if s == nil {
			return nil, invalidArg("snapshot")
		}
		sd := s.disks[req.DeviceKey]
		if sd == nil {
			return nil, invalidArg("deviceKey")
		}
		if sd.identity == "" {
			return nil, &cbtFault{
				fmt.Sprintf("Error caused by file %s: changed block tracking was not enabled when the snapshot was taken", sd.visible),
				&types.FileFault{File: sd.visible},
			}
		}
		target, capacity, targetSeq, targetIdentity = sd.hidden, sd.capacity, sd.seq, sd.identity
	} else {
		if live == nil || live.path == "" {
			return nil, invalidArg("deviceKey")
		}
		d := v.disks[live.key]
		target, capacity, targetSeq, targetIdentity = live.path, live.capacity, d.seq, d.identity
	}
	if req.StartOffset >= capacity {
		return nil, invalidArg("startOffset")
	}

	var areas []extent
	if req.ChangeId == "*" {
		f, err := os.Open(target)
		if err != nil {
			return nil, &cbtFault{err.Error(), &types.FileFault{File: target}}
		}
		exts, err := dataExtents(f, req.StartOffset, capacity)
		f.Close()
		if err != nil {
			return nil, &cbtFault{err.Error(), &types.FileFault{File: target}}
		}
		areas = roundExtents(exts, c.o.cbtBlock, capacity)
	} else {
		i := strings.LastIndex(req.ChangeId, "/")
		if i <= 0 {
			return nil, invalidArg("changeId")
		}
		seq, err := strconv.Atoi(req.ChangeId[i+1:])
		if err != nil || seq < 1 {
			return nil, invalidArg("changeId")
		}
		d := v.disks[req.DeviceKey]
		if d == nil || req.ChangeId[:i] != d.identity || targetIdentity != d.identity || seq > targetSeq {
			return nil, invalidArg("changeId")
		}
		for n := seq + 1; n <= targetSeq; n++ {
			h, ok := d.history[n]
			if !ok {
				return nil, invalidArg("changeId")
			}
			areas = append(areas, h...)
		}
		if req.Snapshot == nil && d.baseline != "" {
			diff, err := diffBlocks(d.baseline, target, c.o.cbtBlock)
			if err != nil {
				return nil, &cbtFault{err.Error(), &types.FileFault{File: target}}
			}
			areas = append(areas, diff...)
		}
		areas = mergeExtents(areas)
	}

	// Clip to [startOffset, capacity) and page like vSphere (caller continues at start+length).
	end := capacity
	if c.o.cbtMaxLength > 0 && req.StartOffset+c.o.cbtMaxLength < end {
		end = req.StartOffset + c.o.cbtMaxLength
	}
	sort.Slice(areas, func(i, j int) bool { return areas[i].Start < areas[j].Start })
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset}
	for _, a := range areas {
		s, e := a.Start, a.end()
		if s < req.StartOffset {
			s = req.StartOffset
		}
		if e > end {
			e = end
		}
		if e <= s {
			continue
		}
		if c.o.cbtMaxAreas > 0 && len(info.ChangedArea) == c.o.cbtMaxAreas {
			end = s
			break
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: s, Length: e - s})
	}
	info.Length = end - req.StartOffset
	return info, nil
}
