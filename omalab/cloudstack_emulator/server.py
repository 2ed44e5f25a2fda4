"""HTTP front end (``/client/api`` plus the ``/_emulator/*`` control path) and the public class."""
from __future__ import annotations

import hmac
import json
import threading
from collections import Counter, deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from secrets import token_urlsafe
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

from .commands import COMMANDS, Ctx, Submit
from .errors import ApiError
from .jobs import JobRunner
from .signing import compute_signature, java_sort_key, parse_expires
from .state import Job, State, new_uuid
from .storage import byid_name, local_mac

__all__ = ["AUTH_ERROR_TEXT", "UNKNOWN_COMMAND_TEXT", "CloudStackEmulator"]

AUTH_ERROR_TEXT = "unable to verify user credentials and/or request signature"
UNKNOWN_COMMAND_TEXT = "The given command does not exist or it is not available for user"
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
_DEFAULT_CSCODES = {401: None, 431: 4350, 432: 9999, 530: 4250, 531: 4365}


class _Fault:
    def __init__(self, command: str, times: int | None, errorcode: int, errortext: str,
                 cserrorcode: int | None, async_job: bool) -> None:
        self.command = command
        self.remaining = times
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode
        self.async_job = async_job

    def error(self) -> ApiError:
        return ApiError(self.errorcode, self.errortext, self.cserrorcode, "server")


class CloudStackEmulator:
    """A CloudStack management server API on 127.0.0.1, good enough for the ``cs`` client.

    Use ``start()``/``stop()`` or a ``with`` block.  ``url``, ``api_key`` and ``secret_key`` are
    what a client needs; ``ids`` maps names of the seeded objects to their uuids.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        byid_dir: str | Path | None = None,
        oma_mac: str | None = "auto",
        job_delay: float = 0.2,
        api_key: str | None = None,
        secret_key: str | None = None,
        second_api_key: str | None = None,
        second_secret_key: str | None = None,
        unknown_command_status: int = 432,
        oma_vm_account: str = "admin",
    ) -> None:
        if unknown_command_status not in (401, 432):
            raise ValueError("unknown_command_status must be 432 (CloudStack <= 4.9) or 401 (later)")
        self.state_dir = Path(state_dir).resolve()
        self.byid_dir = Path(byid_dir).resolve() if byid_dir else self.state_dir / "dev/disk/by-id"
        self.oma_mac = (local_mac() if oma_mac in (None, "auto") else oma_mac).lower()
        self.api_key = api_key or token_urlsafe(64)
        self.secret_key = secret_key or token_urlsafe(64)
        self.second_api_key = second_api_key or token_urlsafe(64)
        self.second_secret_key = second_secret_key or token_urlsafe(64)
        self.job_delay = job_delay
        self.unknown_command_status = unknown_command_status
        self._host, self._port = host, port
        self.state = State(
            self.state_dir, self.byid_dir, oma_mac=self.oma_mac, api_key=self.api_key,
            secret_key=self.secret_key, second_api_key=self.second_api_key,
            second_secret_key=self.second_secret_key, oma_vm_account=oma_vm_account,
        )
        self._jobs = JobRunner(self.state)
        self._meta = threading.Lock()
        self._faults: list[_Fault] = []
        self._delays: dict[str, float] = {}
        self._calls: Counter[str] = Counter()
        self._requests: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self._host, self._port), _Handler)
        httpd.daemon_threads = True
        httpd.emulator = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._jobs.start()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="cloudstack-emulator-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._jobs.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses and ids

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("emulator not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/client/api"

    @property
    def ids(self) -> dict[str, str]:
        """Seeded object uuids by name (zone, zone2, disk_offering, service_offering, template...)."""
        return dict(self.state.ids)

    account_name = "admin"
    second_account_name = "tenant-b"

    @property
    def oma_vm_id(self) -> str:
        return self.state.ids["oma_vm"]

    @property
    def zone_id(self) -> str:
        return self.state.ids["zone"]

    @property
    def zone2_id(self) -> str:
        return self.state.ids["zone2"]

    @property
    def disk_offering_id(self) -> str:
        """The custom-size disk offering (``iscustomized=true``)."""
        return self.state.ids["disk_offering"]

    @property
    def service_offering_id(self) -> str:
        """The custom compute offering (``iscustomized=true``)."""
        return self.state.ids["service_offering"]

    @property
    def template_id(self) -> str:
        """A ready, featured template smaller than 2 GiB, in both zones."""
        return self.state.ids["template"]

    @property
    def network_id(self) -> str:
        """``prod-network`` in zone-a (the OMA VM sits on ``oma-mgmt-network``)."""
        return self.state.ids["network"]

    def info(self) -> dict[str, Any]:
        """Everything a client of the lab needs, as printed by ``python -m omalab.cloudstack_emulator``."""
        return {
            "url": self.url, "api_key": self.api_key, "secret_key": self.secret_key,
            "second_api_key": self.second_api_key, "second_secret_key": self.second_secret_key,
            "account": self.account_name, "state_dir": str(self.state_dir),
            "byid_dir": str(self.byid_dir), "oma_vm_id": self.oma_vm_id, "oma_mac": self.oma_mac,
            "zone_id": self.zone_id, "disk_offering_id": self.disk_offering_id,
            "service_offering_id": self.service_offering_id, "template_id": self.template_id,
            "network_id": self.network_id, "job_delay": self.job_delay, "ids": self.ids,
        }

    def client(self, **kwargs: Any):
        """A ``cs.CloudStack`` for this emulator (poll_interval 0.05 unless given)."""
        import cs

        kwargs.setdefault("poll_interval", 0.05)
        return cs.CloudStack(endpoint=self.url, key=kwargs.pop("key", self.api_key),
                             secret=kwargs.pop("secret", self.secret_key), **kwargs)

    # ------------------------------------------------------------------ files

    def volume_path(self, volume_id: str) -> Path:
        return self.state.volume_file(volume_id)

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.state.snapshot_file(snapshot_id)

    def device_path(self, volume_id: str) -> Path:
        """Where the OMA guest sees the volume when attached: ``<byid_dir>/virtio-<20 hex>``."""
        return self.byid_dir / byid_name(volume_id)

    # ------------------------------------------------------------------ test controls

    def fail(self, command: str, times: int | None = 1, errorcode: int = 530,
             errortext: str | None = None, async_job: bool = False,
             cserrorcode: int | None = None) -> None:
        """Make the next ``times`` calls of ``command`` fail (``times=None``: until cleared).

        ``async_job=False``: the call itself answers HTTP ``errorcode`` with CloudStack's error
        envelope, nothing changes.  ``async_job=True`` (async commands only): the call returns a
        jobid as usual (for create commands the entity is allocated, as CloudStack's create phase
        does) and the job ends with jobstatus 2 and ``{"errorcode", "errortext"}``.
        """
        spec = COMMANDS.get(command)
        if spec is None:
            raise ValueError(f"the emulator does not implement {command!r}")
        if async_job and not spec.is_async:
            raise ValueError(f"{command} is synchronous; it cannot fail as an async job")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        text = errortext or f"Injected failure of {command}"
        code = _DEFAULT_CSCODES.get(errorcode, 9999) if cserrorcode is None else cserrorcode
        with self._meta:
            self._faults.append(_Fault(command, times, errorcode, text, code, async_job))

    def clear_faults(self) -> None:
        with self._meta:
            self._faults.clear()

    def set_job_delay(self, seconds: float, command: str | None = None) -> None:
        """How long jobs stay pending (all commands, or one command)."""
        if command is None:
            self.job_delay = seconds
        else:
            with self._meta:
                self._delays[command] = seconds

    @property
    def calls(self) -> dict[str, int]:
        """Authenticated calls per command since start/reset (includes queryAsyncJobResult)."""
        with self._meta:
            return dict(self._calls)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The last 10,000 API requests: ``{"command", "params" (no signature), "status"}``."""
        with self._meta:
            return [dict(r) for r in self._requests]

    def reset_calls(self) -> None:
        with self._meta:
            self._calls.clear()
            self._requests.clear()

    def reset(self) -> None:
        """Back to the seeded inventory: files, links, jobs, faults, delays and counters."""
        self._jobs.clear()
        self._jobs.wait_idle(5)
        self.state.seed()
        with self._meta:
            self._faults.clear()
            self._delays.clear()
            self._calls.clear()
            self._requests.clear()

    def wait_for_jobs(self, timeout: float = 10.0) -> bool:
        """Block until every submitted job has finished; False on timeout."""
        return self._jobs.wait_idle(timeout)

    def add_vm(self, name: str, *, zone_id: str | None = None, network_ids: list[str] | None = None,
               state: str = "Running", mac: str | None = None, account: str = "admin",
               template_id: str | None = None) -> str:
        """Add a VM directly (no API call, no job); returns its id."""
        st = self.state
        with st.lock:
            owner = next(a for a in st.accounts.values() if a.name == account)
            user = next(u for u in st.users.values() if u.account_id == owner.id)
            zone = st.zones[zone_id or st.ids["zone"]]
            nets = [st.networks[n] for n in (network_ids or [st.ids["network"]])]
            tpl = st.templates[template_id or st.ids["template"]]
            so = st.service_offerings[st.ids["service_offering_small"]]
            vm = st.add_vm(name, name, owner, user, zone, tpl, so, nets, state, mac=mac)
            st.sync_links()
            return vm.id

    def get(self, kind: str, obj_id: str) -> dict | None:
        """The API JSON of a volume/vm/snapshot/network (admin view), or None."""
        st = self.state
        with st.lock:
            obj = st.table(kind).get(obj_id)
            if obj is None:
                return None
            return getattr(st, f"render_{kind}")(obj)

    # ------------------------------------------------------------------ request handling

    def _record(self, command: str | None, params: dict[str, str], status: int,
                counted: bool) -> None:
        with self._meta:
            if counted and command:
                self._calls[command] += 1
            self._requests.append({
                "command": command, "status": status,
                "params": {k: v for k, v in params.items() if k.lower() != "signature"},
            })

    def _take_fault(self, command: str) -> _Fault | None:
        with self._meta:
            for fault in self._faults:
                if fault.command == command:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _verify(self, params: dict[str, str]):
        """ApiServer.verifyRequest for API-key requests: the user, or None (-> 401)."""
        signature = api_key = version = expires = None
        for name in sorted(params, key=java_sort_key):  # the last of case-variants wins, as in Java
            lower = name.lower()
            if lower == "signature":
                signature = params[name]
            elif lower == "apikey":
                api_key = params[name]
            elif lower == "signatureversion":
                version = params[name]
            elif lower == "expires":
                expires = params[name]
        if signature is None or api_key is None:
            return None
        if version == "3":
            if expires is None:
                return None
            when = parse_expires(expires)
            if when is None or when < datetime.now(UTC):
                return None
        with self.state.lock:
            user = self.state.user_by_key(api_key)
            if user is None:
                return None
            account = self.state.accounts[user.account_id]
            if user.state != "enabled" or account.state != "enabled":
                return None
            secret = user.secret_key
        expected = compute_signature(params, secret)
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"),
                                   expected.encode("ascii")):
            return None
        return user

    def handle_api(self, query: str, body: bytes, content_type: str) -> tuple[int, dict, str, dict]:
        """Process one ``/client/api`` request: (status, body, response type, extra headers)."""
        pairs = parse_qsl(query, keep_blank_values=True)
        if body and content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params: dict[str, str] = {}
        for key, value in pairs:
            params.setdefault(key, value)  # the servlet's parameter map: first value wins
        rtype = "json" if params.get("response", "").lower() == "json" else "xml"
        command = params.get("command")

        if command is not None and command not in COMMANDS and self.unknown_command_status == 432:
            # CloudStack <= 4.9 checks the command before the signature
            err = ApiError(432, UNKNOWN_COMMAND_TEXT, 9999, "server")
            self._record(command, params, 432, counted=False)
            return 432, _error_body("errorresponse", err), rtype, {"X-Description": err.errortext}
        user = self._verify(params) if command in COMMANDS else None
        if user is None:
            name = f"{command.lower()}response" if command in COMMANDS else "errorresponse"
            self._record(command, params, 401, counted=False)
            err = ApiError(401, AUTH_ERROR_TEXT, None, "server")
            return 401, _error_body(name, err), rtype, {}

        spec = COMMANDS[command]
        fault = self._take_fault(command)
        if fault is not None and not fault.async_job:
            self._record(command, params, fault.errorcode, counted=True)
            return self._error(command, fault.error(), rtype)
        st = self.state
        with st.lock:
            ctx = Ctx(st, command, params, user)
            try:
                out = spec.handler(ctx)
            except ApiError as err:
                self._record(command, params, err.errorcode, counted=True)
                return self._error(command, err, rtype)
            if spec.is_async:
                assert isinstance(out, Submit)
                job = Job(new_uuid(), command, spec.cmd_class, user.account_id, user.id,
                          spec.instance_type, out.instance_id)
                st.jobs[job.id] = job
                work = out.work if fault is None else _raiser(fault.error())
                with self._meta:
                    delay = self._delays.get(command, self.job_delay)
                self._jobs.submit(job, work, out.on_fail, delay)
                result: dict = {"id": out.object_id, "jobid": job.id} if spec.creates \
                    else {"jobid": job.id}
            else:
                result = out  # type: ignore[assignment]
            st.sync_links()
        self._record(command, params, 200, counted=True)
        return 200, {f"{command.lower()}response": result}, rtype, {}

    def _error(self, command: str, err: ApiError, rtype: str) -> tuple[int, dict, str, dict]:
        name = "errorresponse" if err.errorcode == 432 else f"{command.lower()}response"
        return err.errorcode, _error_body(name, err), rtype, {"X-Description": err.errortext}

    def handle_control(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        """``/_emulator/{fail,clear_faults,delay,calls,requests,reset,info,state,wait}``."""
        action = path[len("/_emulator/"):].strip("/")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "body must be JSON"}
        try:
            if action == "fail" and method == "POST":
                self.fail(data["command"], times=data.get("times", 1),
                          errorcode=int(data.get("errorcode", 530)),
                          errortext=data.get("errortext"), async_job=bool(data.get("async", False)),
                          cserrorcode=data.get("cserrorcode"))
                return 200, {"ok": True}
            if action == "clear_faults" and method == "POST":
                self.clear_faults()
                return 200, {"ok": True}
            if action == "delay" and method == "POST":
                self.set_job_delay(float(data["seconds"]), data.get("command"))
                return 200, {"ok": True}
            if action == "calls":
                return 200, {"calls": self.calls}
            if action == "requests":
                return 200, {"requests": self.requests}
            if action == "reset" and method == "POST":
                self.reset()
                return 200, {"ok": True}
            if action == "info":
                return 200, self.info()
            if action == "wait" and method == "POST":
                return 200, {"idle": self.wait_for_jobs(float(data.get("timeout", 10)))}
            if action == "state":
                st = self.state
                with st.lock:
                    return 200, {
                        "virtualmachines": [st.render_vm(v) for v in st.vms.values()],
                        "volumes": [st.render_volume(v) for v in st.volumes.values()],
                        "snapshots": [st.render_snapshot(s) for s in st.snapshots.values()],
                        "jobs": [st.render_job(j) for j in st.jobs.values()],
                    }
        except (KeyError, TypeError, ValueError) as exc:
            return 400, {"error": f"{type(exc).__name__}: {exc}"}
        return 404, {"error": f"no control action {method} {action!r}"}


def _raiser(err: ApiError):
    def work() -> dict:
        raise err
    return work


def _error_body(name: str, err: ApiError) -> dict:
    inner: dict[str, Any] = {"uuidList": [], "errorcode": err.errorcode}
    if err.cserrorcode is not None:
        inner["cserrorcode"] = err.cserrorcode
    inner["errortext"] = err.errortext
    return {name: inner}


def _to_xml(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"<{name}>" + "".join(_xml_items(k, v) for k, v in value.items()) + f"</{name}>"
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{name}>{escape(str(value))}</{name}>"


def _xml_items(name: str, value: Any) -> str:
    if isinstance(value, list):
        return "".join(_to_xml(name, v) for v in value)
    return _to_xml(name, value)


def _header_safe(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1").replace("\r", " ").replace("\n", " ")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "CloudStackEmulator/1.0"
    timeout = 120  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._handle(self.rfile.read(length) if length else b"")

    def _send(self, status: int, ctype: str, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, _header_safe(value))
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self, body: bytes) -> None:
        emu: CloudStackEmulator = self.server.emulator  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        if url.path.startswith("/_emulator/"):
            status, data = emu.handle_control(self.command, url.path, body)
            self._send(status, JSON_CONTENT_TYPE, json.dumps(data).encode())
            return
        if url.path.rstrip("/") != "/client/api":
            self._send(404, "text/html; charset=UTF-8",
                       b"<html><body><h2>HTTP ERROR 404</h2>Not Found</body></html>")
            return
        try:
            status, data, rtype, headers = emu.handle_api(
                url.query, body, self.headers.get("Content-Type", ""))
        except Exception as exc:  # noqa: BLE001 - an emulator bug: answer like an unhandled error
            status, rtype, headers = 530, "json", {}
            data = _error_body("errorresponse", ApiError(530, f"{type(exc).__name__}: {exc}", 4250,
                                                         "runtime"))
        if rtype == "json":
            self._send(status, JSON_CONTENT_TYPE, json.dumps(data).encode("utf-8"), headers)
        else:
            [(name, inner)] = data.items()
            xml = '<?xml version="1.0" encoding="UTF-8"?>' + _to_xml(name, inner)
            self._send(status, "text/xml; charset=UTF-8", xml.encode("utf-8"), headers)
