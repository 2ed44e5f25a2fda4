// Command vcsim is the project's simulated vCenter: govmomi's simulator (Debian
// golang-github-vmware-govmomi-dev 0.24.2, a VPX model) extended for the test lab.
//
// Build (offline, GOPATH mode; omalab/vcsim/__init__.py does this and caches the binary):
//
//	GO111MODULE=off GOPATH=$PWD/.gopath/vcsim:/usr/share/gocode GOFLAGS= GOCACHE=$PWD/.gocache \
//	    go build -o vcsim ./omalab/vcsim
//
// Inventory (flags -dc, -clusters, -hosts, -standalone-hosts, -datastores, -networks, -dvpg,
// -vms, -disks, -disk-size, -data-vms; see -h):
//   - datacenters DC0.., clusters <DC>_C<k>, hosts <DC>_C<k>_H<n>; datastores LocalDS_<n>
//     (numbered over all datacenters) are real folders <dir>/LocalDS_<n>, mounted on every
//     host of their datacenter; networks "VM Network" + VLAN-<100+k> (standard port groups)
//     and <DC>_DVPG<k> on switch DVS0 (distributed), so NIC backings differ;
//   - VMs vm-0000.. (prefix -vm-prefix), VM i in DC i%ndc, round-robin over that DC's hosts
//     and over the folders vm/, vm/Folder1, vm/Folder1/Nested1, vm/Folder2
//     (e.g. /DC0/vm/Folder1/vm-0002); guest ids cycle over Windows and Linux ids; power state
//     poweredOff for i%4==3, suspended for i%23==22, else poweredOn; VMware Tools "none"
//     (not installed) for i%10==9, "old" for i%10==4, else current; guest IP/hostname/NIC/disk
//     info while tools run (and it follows PowerOn/PowerOff/ShutdownGuest/Reset/Suspend);
//   - devices: SCSI controller 1000+bus (pvscsi, LSI SAS for Windows), disks with key
//     2000+16*bus+unit (2000, 2001, ...; unit 7 skipped), controllerKey 1000+bus, flat-v2
//     backings "[LocalDS_n] vm/vm.vmdk", "[LocalDS_n] vm/vm_1.vmdk", ... (thinProvisioned for
//     (i+disk)%2==1), CD-ROM 3000 on IDE 200, NICs 4000+ (vmxnet3; e1000e 2nd NIC on Windows);
//   - every disk is a sparse raw file of exactly capacityInBytes at <ds dir>/vm/vm.vmdk
//     ("vm-flat.vmdk" is a hard link to it, the simulator needs that name for disk edits);
//     the first -data-vms VMs get deterministic pseudo-random data in parts of their disks
//     (holes in between, some explicitly written zero ranges); <dir>/inventory.json lists
//     all VMs with morefs, paths, disks (keys, files, local paths, capacities) and NICs.
//
// Start line: once listening, ONE JSON line on stdout:
//
//	{"url":"https://127.0.0.1:PORT/sdk","host":"127.0.0.1","port":PORT,"address":"127.0.0.1:PORT",
//	 "username":..,"password":..,"thumbprint_sha1":"AB:CD:..","thumbprint_sha256":"..",
//	 "cert_file":"<dir>/vcsim-cert.pem","datastores":{"LocalDS_0":"<dir>/LocalDS_0",..},
//	 "datastore_datacenters":{"LocalDS_0":"DC0",..},"datacenters":["DC0",..],"vm_count":N,
//	 "data_vms":["vm-0000",..],"manifest":"<dir>/inventory.json","root":"<dir>",
//	 "change_id_format":"vsphere","cbt_block_size":65536,"about":"VMware vCenter Server 6.5.0 ..",
//	 "pid":..,"startup_seconds":..}
//
// then it serves until SIGTERM/SIGINT (or stdin EOF with -exit-on-stdin-eof). TLS uses a fresh
// self-signed ECDSA certificate (127.0.0.1/localhost); -username/-password are the only valid
// login (anything else: vim.fault.InvalidLogin).
//
// Changed Block Tracking (cbt.go): ReconfigVM changeTrackingEnabled=true/false; every
// off->on transition (and a disk capacity change) gives each disk a new CBT identity.
// CreateSnapshot_Task freezes a sparse copy of every disk as "<disk>-snap-<n>.vmdk" next to
// the base file; the snapshot's config.hardware.device shows those files with
// backing.changeId "<identity>/<seq>" (empty while CBT is off). The identity is vSphere's
// form "52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx" (or a plain RFC 4122 uuid with
// -changeid-format uuid). The VM's own disks keep pointing at the live base files.
// QueryChangedDiskAreas (answered here, the simulator lacks it): "*" = data extents of the
// snapshot's frozen copy (SEEK_DATA/SEEK_HOLE) rounded to -cbt-block; "<identity>/<s>" =
// exactly the blocks that differ between consecutive frozen copies s..t (t = the snapshot's
// sequence). Without a snapshot argument the live file is the target. Answers cover
// [startOffset, disk end), capped by -cbt-max-length and -cbt-max-areas (caller pages on at
// startOffset+length). Faults: CBT off, or a snapshot taken with CBT off -> vim.fault.FileFault;
// garbled/unknown/stale (older identity) change id, unknown snapshot or device key, bad
// startOffset -> vmodl.fault.InvalidArgument; no session -> NotAuthenticated. Change ids stay
// valid after their snapshot is removed (a hidden store <dir>/.cbt-store keeps the newest
// frozen copy per disk; older ones only while a snapshot uses them).
//
// Other fixes over the stock 0.24.2 simulator: RemoveSnapshot_Task's TaskInfo.entity is the
// VM (stock: the snapshot, which pyVmomi's WaitForTask cannot deserialize), removing a
// snapshot deletes its frozen files; Fetch of an unset property answers empty (pyVmomi: None)
// instead of panicking; ShutdownGuest/RebootGuest need running tools (ToolsUnavailable), with
// -shutdown-delay ShutdownGuest is asynchronous; -latency adds a delay to every SOAP call.
// RevertToSnapshot does not restore disk contents.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	_ "net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
)

type options struct {
	listen          string
	username        string
	password        string
	dir             string
	datacenters     int
	clusters        int
	hosts           int
	standaloneHosts int
	datastores      int
	networks        int
	dvpgs           int
	vms             int
	disks           int
	diskSizes       []int64
	dataVMs         int
	vmPrefix        string
	seed            int64
	latency         time.Duration
	cbtBlock        int64
	cbtMaxAreas     int
	cbtMaxLength    int64
	changeIDFormat  string
	shutdownDelay   time.Duration
	sessionIdle     time.Duration
	exitOnStdinEOF  bool
	cleanup         bool
	trace           bool
	cpuProfile      string
}

// startInfo is the single JSON line printed on stdout once the server listens.
type startInfo struct {
	URL                  string            `json:"url"`
	Host                 string            `json:"host"`
	Port                 int               `json:"port"`
	Address              string            `json:"address"`
	Username             string            `json:"username"`
	Password             string            `json:"password"`
	ThumbprintSHA1       string            `json:"thumbprint_sha1"`
	ThumbprintSHA256     string            `json:"thumbprint_sha256"`
	CertFile             string            `json:"cert_file"`
	Datastores           map[string]string `json:"datastores"`
	DatastoreDatacenters map[string]string `json:"datastore_datacenters"`
	Datacenters          []string          `json:"datacenters"`
	VMCount              int               `json:"vm_count"`
	DataVMs              []string          `json:"data_vms"`
	Manifest             string            `json:"manifest"`
	Root                 string            `json:"root"`
	ChangeIDFormat       string            `json:"change_id_format"`
	CBTBlockSize         int64             `json:"cbt_block_size"`
	About                string            `json:"about"`
	PID                  int               `json:"pid"`
	StartupSeconds       float64           `json:"startup_seconds"`
}

func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{
		{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
		{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1},
	}
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), 10, 64)
			if err != nil {
				return 0, err
			}
			return n * u.mult, nil
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

func parseFlags() *options {
	o := &options{}
	var diskSize, cbtBlock, cbtMaxLen string
	flag.StringVar(&o.listen, "listen", "127.0.0.1:0", "listen address (host:port, port 0 = free port)")
	flag.StringVar(&o.username, "username", "administrator@vsphere.local", "login user name")
	flag.StringVar(&o.password, "password", "VMware1!", "login password")
	flag.StringVar(&o.dir, "dir", "", "root folder for datastores and the CBT store (default: a temp dir removed at exit); datastore sub-folders are wiped at start")
	flag.IntVar(&o.datacenters, "dc", 1, "number of datacenters")
	flag.IntVar(&o.clusters, "clusters", 1, "clusters per datacenter")
	flag.IntVar(&o.hosts, "hosts", 2, "hosts per cluster")
	flag.IntVar(&o.standaloneHosts, "standalone-hosts", 0, "standalone hosts per datacenter")
	flag.IntVar(&o.datastores, "datastores", 1, "local datastores per datacenter (named LocalDS_<n>, n counted over all datacenters)")
	flag.IntVar(&o.networks, "networks", 1, "standard port groups per datacenter in addition to 'VM Network' (named VLAN-<100+k>)")
	flag.IntVar(&o.dvpgs, "dvpg", 1, "distributed port groups per datacenter (named <DC>_DVPG<k>, on switch DVS0)")
	flag.IntVar(&o.vms, "vms", 10, "total number of VMs, spread over datacenters and hosts")
	flag.IntVar(&o.disks, "disks", 2, "disks per VM")
	flag.StringVar(&diskSize, "disk-size", "64MiB", "disk capacity, or comma list per disk index (last repeats), e.g. 64MiB,32MiB")
	flag.IntVar(&o.dataVMs, "data-vms", 0, "fill the disks of the first N VMs with deterministic pseudo-random data (with holes)")
	flag.StringVar(&o.vmPrefix, "vm-prefix", "vm-", "VM name prefix (names are <prefix><zero-padded index>)")
	flag.Int64Var(&o.seed, "seed", 1, "seed for the data pattern")
	flag.DurationVar(&o.latency, "latency", 0, "extra latency added to every SOAP call, e.g. 1ms")
	flag.StringVar(&cbtBlock, "cbt-block", "64KiB", "CBT block size (granularity of changed/allocated areas)")
	flag.IntVar(&o.cbtMaxAreas, "cbt-max-areas", 4096, "max changedArea entries per QueryChangedDiskAreas answer (caller pages on)")
	flag.StringVar(&cbtMaxLen, "cbt-max-length", "1GiB", "max DiskChangeInfo.length per answer (0 = to disk end)")
	flag.StringVar(&o.changeIDFormat, "changeid-format", "vsphere", "change id uuid form: vsphere ('52 xx .. xx-xx .. xx/<seq>') or uuid ('<8-4-4-4-12>/<seq>')")
	flag.DurationVar(&o.shutdownDelay, "shutdown-delay", 0, "ShutdownGuest powers the VM off after this delay (0 = at once, like stock vcsim)")
	flag.DurationVar(&o.sessionIdle, "session-idle-timeout", 0, "log sessions out after this long without a call, like vCenter's session timeout (0 = never)")
	flag.BoolVar(&o.exitOnStdinEOF, "exit-on-stdin-eof", false, "exit when stdin reaches EOF (parent died)")
	flag.BoolVar(&o.cleanup, "cleanup", false, "remove -dir at exit (a temp dir made without -dir is always removed)")
	flag.BoolVar(&o.trace, "trace", false, "log SOAP traffic to stderr")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the start-up to this file")
	flag.Parse()

	var err error
	for _, s := range strings.Split(diskSize, ",") {
		n, perr := parseSize(s)
		if perr != nil || n <= 0 {
			log.Fatalf("bad -disk-size %q", diskSize)
		}
		o.diskSizes = append(o.diskSizes, n)
	}
	if o.cbtBlock, err = parseSize(cbtBlock); err != nil || o.cbtBlock < 512 || o.cbtBlock%512 != 0 {
		log.Fatalf("bad -cbt-block %q", cbtBlock)
	}
	if o.cbtMaxLength, err = parseSize(cbtMaxLen); err != nil || o.cbtMaxLength < 0 {
		log.Fatalf("bad -cbt-max-length %q", cbtMaxLen)
	}
	if o.changeIDFormat != "vsphere" && o.changeIDFormat != "uuid" {
		log.Fatalf("bad -changeid-format %q", o.changeIDFormat)
	}
	if o.datacenters < 1 || o.clusters < 0 || o.hosts < 0 || o.datastores < 1 || o.disks < 0 || o.vms < 0 {
		log.Fatal("bad inventory sizes")
	}
	if o.clusters*o.hosts+o.standaloneHosts < 1 {
		log.Fatal("need at least one host per datacenter")
	}
	if o.disks > 60 {
		log.Fatal("at most 60 disks per VM (4 SCSI controllers)")
	}
	if o.dataVMs > o.vms {
		o.dataVMs = o.vms
	}
	return o
}

// selfSignedCert makes an ECDSA P-256 certificate for 127.0.0.1/localhost.
func selfSignedCert() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "vcsim.local", Organization: []string{"vcsim test lab"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(5, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost", "vcsim.local", host},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, nil
}

func colonHex(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":")
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("vcsim: ")
	o := parseFlags()
	t0 := time.Now()

	root := o.dir
	ownRoot := o.cleanup
	if root == "" {
		d, err := ioutil.TempDir("", "vcsim-")
		if err != nil {
			log.Fatal(err)
		}
		root, ownRoot = d, true
	}
	root, _ = filepath.Abs(root)
	if err := os.MkdirAll(root, 0o755); err != nil {
		log.Fatal(err)
	}
	cleanup := func() {
		if ownRoot {
			os.RemoveAll(root)
		}
	}

	simulator.Trace = o.trace
	if o.cpuProfile != "" {
		pf, err := os.Create(o.cpuProfile)
		if err != nil {
			log.Fatal(err)
		}
		pprof.StartCPUProfile(pf)
	}

	debug.SetGCPercent(400) // start-up allocates a lot of short-lived garbage
	model := simulator.VPX()
	model.Datacenter = o.datacenters
	model.Cluster = o.clusters
	model.ClusterHost = o.hosts
	model.Host = o.standaloneHosts
	model.Datastore = 0 // created below, in our own folders
	model.Machine = 0   // created below
	model.Portgroup = o.dvpgs
	model.Autostart = false
	simulator.SessionIdleTimeout = o.sessionIdle
	if err := model.Create(); err != nil {
		cleanup()
		log.Fatalf("model: %s", err)
	}

	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		cleanup()
		log.Fatalf("in-process client: %s", err)
	}

	inv, err := buildInventory(ctx, client, o, root)
	if err != nil {
		cleanup()
		log.Fatalf("inventory: %s", err)
	}

	cbt := newCBT(o, root, inv)
	inv.cbt = cbt

	cert, der, err := selfSignedCert()
	if err != nil {
		cleanup()
		log.Fatal(err)
	}
	certFile := filepath.Join(root, "vcsim-cert.pem")
	if err := ioutil.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		cleanup()
		log.Fatal(err)
	}

	model.Service.Listen = &url.URL{Scheme: "https", Host: o.listen, User: url.UserPassword(o.username, o.password)}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv := model.Service.NewServer()
	mux := srv.Config.Handler
	srv.Config.Handler = newHandler(mux, inv, cbt, o, client)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshake noise from port probes

	addr := srv.Listener.Addr().(*net.TCPAddr)
	s1 := sha1.Sum(der)
	s256 := sha256.Sum256(der)
	about := client.ServiceContent.About
	info := startInfo{
		URL:                  fmt.Sprintf("https://%s/sdk", net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port))),
		Host:                 addr.IP.String(),
		Port:                 addr.Port,
		Address:              net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port)),
		Username:             o.username,
		Password:             o.password,
		ThumbprintSHA1:       colonHex(s1[:]),
		ThumbprintSHA256:     colonHex(s256[:]),
		CertFile:             certFile,
		Datastores:           inv.datastoreDirs,
		DatastoreDatacenters: inv.datastoreDCs,
		Datacenters:          inv.datacenterNames,
		VMCount:              len(inv.vms),
		DataVMs:              inv.dataVMNames(),
		Manifest:             inv.manifestPath,
		Root:                 root,
		ChangeIDFormat:       o.changeIDFormat,
		CBTBlockSize:         o.cbtBlock,
		About:                about.FullName,
		PID:                  os.Getpid(),
		StartupSeconds:       time.Since(t0).Seconds(),
	}
	if o.cpuProfile != "" {
		pprof.StopCPUProfile()
	}
	debug.SetGCPercent(100)
	runtime.GC()
	if a := os.Getenv("VCSIM_PPROF"); a != "" {
		go func() { log.Print(http.ListenAndServe(a, nil)) }()
	}
	line, _ := json.Marshal(info)
	os.Stdout.Write(append(line, '\n'))
	log.Printf("listening on %s (%d VMs, started in %.2fs)", info.URL, len(inv.vms), info.StartupSeconds)

	done := make(chan os.Signal, 2)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	if o.exitOnStdinEOF {
		go func() {
			io.Copy(io.Discard, os.Stdin)
			done <- syscall.SIGTERM
		}()
	}
	sig := <-done
	log.Printf("%s: stopping", sig)
	srv.CloseClientConnections()
	srv.Listener.Close()
	cleanup()
}
