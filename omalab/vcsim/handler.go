package main

// HTTP wrapper around the simulator's ServeMux: per-call latency, QueryChangedDiskAreas,
// and hooks before/after a few stock SOAP methods. (Wrapping VM objects does not work in
// govmomi 0.24.2, see the ecosystem notes; intercepting the SOAP request does.)

import (
	"bytes"
	"context"
	"fmt"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

type handler struct {
	next   http.Handler
	inv    *inventory
	cbt    *cbtState
	o      *options
	client *vim25.Client
}

func newHandler(next http.Handler, inv *inventory, cbt *cbtState, o *options, client *vim25.Client) http.Handler {
	return &handler{next: next, inv: inv, cbt: cbt, o: o, client: client}
}

// methodRe finds the first element inside the SOAP Body: the method name.
var methodRe = regexp.MustCompile(`<(?:[A-Za-z0-9_]+:)?Body[^>]*>\s*<(?:[A-Za-z0-9_]+:)?([A-Za-z0-9_]+)`)

// returnvalRe finds a task moref in a *_Task response.
var returnvalRe = regexp.MustCompile(`<returnval[^>]*>([^<]+)</returnval>`)

var hooked = map[string]bool{
	"QueryChangedDiskAreas":   true,
	"CreateSnapshot_Task":     true,
	"RemoveSnapshot_Task":     true,
	"RemoveAllSnapshots_Task": true,
	"ReconfigVM_Task":         true,
	"CreateVM_Task":           true,
	"Destroy_Task":            true,
	"PowerOnVM_Task":          true,
	"PowerOffVM_Task":         true,
	"SuspendVM_Task":          true,
	"ResetVM_Task":            true,
	"ShutdownGuest":           true,
	"RebootGuest":             true,
	"Fetch":                   true,
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
		h.next.ServeHTTP(w, r)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	if h.o.latency > 0 {
		time.Sleep(h.o.latency)
	}
	name := ""
	head := body
	if len(head) > 4096 {
		head = head[:4096]
	}
	if m := methodRe.FindSubmatch(head); m != nil {
		name = string(m[1])
	} else if m := methodRe.FindSubmatch(body); m != nil {
		name = string(m[1])
	}
	if !hooked[name] {
		h.pass(w, r, body)
		return
	}
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		h.pass(w, r, body)
		return
	}
	switch name {
	case "QueryChangedDiskAreas":
		h.queryChangedDiskAreas(w, r, method.Body.(*types.QueryChangedDiskAreas))
	case "Fetch":
		h.fetch(w, r, body)
	case "ShutdownGuest", "RebootGuest":
		h.guestOp(w, r, body, method)
	default:
		h.taskHook(w, r, body, method)
	}
}

func (h *handler) pass(w http.ResponseWriter, r *http.Request, body []byte) {
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	h.next.ServeHTTP(w, r)
}

// record runs the stock handler into a recorder; a panic becomes ok=false (and is logged
// unless quiet).
func (h *handler) record(r *http.Request, body []byte, quiet ...bool) (rec *httptest.ResponseRecorder, ok bool) {
	rec = httptest.NewRecorder()
	defer func() {
		if p := recover(); p != nil {
			if len(quiet) == 0 || !quiet[0] {
				log.Printf("simulator panic: %v", p)
			}
			ok = false
		}
	}()
	r2 := r.Clone(r.Context())
	r2.Body = ioutil.NopCloser(bytes.NewReader(body))
	r2.ContentLength = int64(len(body))
	h.next.ServeHTTP(rec, r2)
	return rec, true
}

func copyResponse(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

// authenticated checks the caller's session by sending a CurrentTime call (which needs
// a session) with the caller's cookies through the stock handler.
func (h *handler) authenticated(r *http.Request) bool {
	const probe = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime></soapenv:Body></soapenv:Envelope>`
	rec, ok := h.record(r, []byte(probe))
	return ok && rec.Code == http.StatusOK
}

// --- SOAP encoding (same envelope as the simulator's ServeSDK) ---

type soapEnvelope struct {
	XMLName xml.Name    `xml:"soapenv:Envelope"`
	Enc     string      `xml:"xmlns:soapenc,attr"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

type faultDetail struct {
	Fault types.AnyType
}

func (d *faultDetail) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	kind := reflect.TypeOf(d.Fault).Elem().Name()
	start.Name.Local = kind + "Fault"
	start.Attr = append(start.Attr,
		xml.Attr{Name: xml.Name{Local: "xmlns"}, Value: "urn:" + vim25.Namespace},
		xml.Attr{Name: xml.Name{Local: "xsi:type"}, Value: kind})
	return e.EncodeElement(d.Fault, start)
}

type soapFault struct {
	XMLName xml.Name `xml:"soapenv:Fault"`
	Code    string   `xml:"faultcode"`
	String  string   `xml:"faultstring"`
	Detail  struct {
		Fault *faultDetail
	} `xml:"detail"`
}

type response struct {
	Body soap.HasFault
}

func (r *response) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	val := reflect.ValueOf(r.Body).Elem().FieldByName("Res")
	res := xml.StartElement{Name: xml.Name{Space: "urn:" + vim25.Namespace, Local: val.Elem().Type().Name()}}
	if err := e.EncodeToken(start); err != nil {
		return err
	}
	if err := e.EncodeElement(val.Interface(), res); err != nil {
		return err
	}
	return e.EncodeToken(start.End())
}

func writeSOAP(w http.ResponseWriter, body soap.HasFault) {
	var soapBody interface{}
	code := http.StatusOK
	if f := body.Fault(); f != nil {
		code = http.StatusInternalServerError
		sf := &soapFault{Code: f.Code, String: f.String}
		sf.Detail.Fault = &faultDetail{f.Detail.Fault}
		soapBody = struct{ Fault *soapFault }{sf}
	} else {
		soapBody = &response{body}
	}
	var out bytes.Buffer
	fmt.Fprint(&out, xml.Header)
	e := xml.NewEncoder(&out)
	err := e.Encode(&soapEnvelope{
		Enc:  "http://schemas.xmlsoap.org/soap/encoding/",
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: soapBody,
	})
	if err == nil {
		err = e.Flush()
	}
	if err != nil {
		log.Printf("encode: %s", err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(code)
	w.Write(out.Bytes())
}

func notAuthenticated(this types.ManagedObjectReference) *soap.Fault {
	return simulator.Fault("", &types.NotAuthenticated{NoPermission: types.NoPermission{Object: this, PrivilegeId: "System.View"}})
}

// --- QueryChangedDiskAreas ---

func (h *handler) queryChangedDiskAreas(w http.ResponseWriter, r *http.Request, req *types.QueryChangedDiskAreas) {
	body := &methods.QueryChangedDiskAreasBody{}
	if !h.authenticated(r) {
		body.Fault_ = notAuthenticated(req.This)
		writeSOAP(w, body)
		return
	}
	info, f := h.cbt.query(req)
	if f != nil {
		body.Fault_ = simulator.Fault(f.msg, f.fault)
	} else {
		body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	}
	writeSOAP(w, body)
}

// --- Fetch: pyvmomi reads single properties with it; the 0.24.2 simulator panics on an
// unset property (property_collector.go Fetch). vCenter answers an empty FetchResponse.

func (h *handler) fetch(w http.ResponseWriter, r *http.Request, body []byte) {
	rec, ok := h.record(r, body, true)
	if ok {
		copyResponse(w, rec)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, xml.Header+`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body></soapenv:Envelope>`)
}

// --- guest operations: need running VMware Tools, like vCenter (vim.fault.ToolsUnavailable).

func (h *handler) toolsRunning(ref types.ManagedObjectReference) (known, running, poweredOn bool) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return false, false, false
	}
	simulator.Map.WithLock(vm, func() {
		poweredOn = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
		running = vm.Guest != nil && vm.Guest.ToolsRunningStatus == string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
	})
	return true, running, poweredOn
}

func (h *handler) guestOp(w http.ResponseWriter, r *http.Request, body []byte, method *simulator.Method) {
	known, running, poweredOn := h.toolsRunning(method.This)
	if known && poweredOn && !running && h.authenticated(r) {
		msg := "Cannot complete operation because VMware Tools is not running in this virtual machine."
		if method.Name == "ShutdownGuest" {
			writeSOAP(w, &methods.ShutdownGuestBody{Fault_: simulator.Fault(msg, &types.ToolsUnavailable{})})
		} else {
			writeSOAP(w, &methods.RebootGuestBody{Fault_: simulator.Fault(msg, &types.ToolsUnavailable{})})
		}
		return
	}
	if method.Name == "ShutdownGuest" && h.o.shutdownDelay > 0 && known && poweredOn && h.authenticated(r) {
		// Asynchronous like vCenter: answer now, power off later.
		ref := method.This
		go func() {
			time.Sleep(h.o.shutdownDelay)
			vm := object.NewVirtualMachine(h.client, ref)
			if err := vm.ShutdownGuest(context.Background()); err != nil {
				log.Printf("delayed ShutdownGuest %s: %s", ref, err)
			}
			h.syncGuest(ref)
		}()
		writeSOAP(w, &methods.ShutdownGuestBody{Res: &types.ShutdownGuestResponse{}})
		return
	}
	rec, ok := h.record(r, body)
	if !ok {
		h.pass(w, r, body)
		return
	}
	if method.Name == "RebootGuest" && rec.Code == http.StatusOK {
		h.syncGuest(method.This)
	}
	if method.Name == "ShutdownGuest" && rec.Code == http.StatusOK {
		h.syncGuest(method.This)
	}
	copyResponse(w, rec)
}

// syncGuest makes guest/tools properties follow the power state.
func (h *handler) syncGuest(ref types.ManagedObjectReference) {
	info := h.inv.vm(ref)
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if info == nil || !ok {
		return
	}
	simulator.Map.WithLock(vm, func() {
		simulator.Map.Update(vm, guestChanges(vm, info))
	})
}

// --- task hooks ---

func taskOf(rec *httptest.ResponseRecorder) (*simulator.Task, bool) {
	if rec.Code != http.StatusOK {
		return nil, false
	}
	m := returnvalRe.FindSubmatch(rec.Body.Bytes())
	if m == nil {
		return nil, false
	}
	t, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(m[1])}).(*simulator.Task)
	return t, ok
}

func (h *handler) taskHook(w http.ResponseWriter, r *http.Request, body []byte, method *simulator.Method) {
	// Pre-hooks.
	var snapVM *types.ManagedObjectReference
	if method.Name == "RemoveSnapshot_Task" {
		if s, ok := simulator.Map.Get(method.This).(*simulator.VirtualMachineSnapshot); ok {
			vm := s.Vm
			snapVM = &vm
		}
	}

	rec, ok := h.record(r, body)
	if !ok {
		writeSOAP(w, &methods.ReconfigVM_TaskBody{Fault_: simulator.Fault("internal simulator error", &types.SystemError{Reason: "simulator panic"})})
		return
	}
	task, isTask := taskOf(rec)
	if !isTask {
		copyResponse(w, rec)
		return
	}
	var state types.TaskInfoState
	var result types.AnyType
	simulator.Map.WithLock(task, func() {
		state = task.Info.State
		result = task.Info.Result
	})
	success := state == types.TaskInfoStateSuccess

	switch method.Name {
	case "CreateSnapshot_Task":
		if success {
			if snap, ok := result.(types.ManagedObjectReference); ok {
				if err := h.cbt.afterCreateSnapshot(method.This, snap); err != nil {
					log.Printf("CreateSnapshot %s: %s", method.This, err)
					simulator.Map.WithLock(task, func() {
						task.Info.State = types.TaskInfoStateError
						task.Info.Error = &types.LocalizedMethodFault{Fault: &types.FileFault{File: err.Error()}, LocalizedMessage: err.Error()}
					})
				}
			}
		}
	case "RemoveSnapshot_Task":
		if snapVM != nil {
			// The simulator creates this task on the snapshot; vCenter's entity is the VM
			// (pyvmomi's TaskInfo.entity must be a ManagedEntity).
			vmRef := *snapVM
			simulator.Map.WithLock(task, func() {
				task.Info.Entity = &vmRef
				task.Info.EntityName = entityName(vmRef)
			})
			h.cbt.reconcile(vmRef)
		}
	case "RemoveAllSnapshots_Task", "Destroy_Task":
		if method.This.Type == "VirtualMachine" {
			h.cbt.reconcile(method.This)
		}
	case "ReconfigVM_Task":
		if success {
			h.cbt.afterReconfig(method.This)
		}
	case "CreateVM_Task":
		if success {
			if ref, ok := result.(types.ManagedObjectReference); ok {
				h.cbt.afterReconfig(ref)
			}
		}
	case "PowerOnVM_Task", "PowerOffVM_Task", "SuspendVM_Task", "ResetVM_Task":
		if success {
			h.syncGuest(method.This)
		}
	}
	copyResponse(w, rec)
}
