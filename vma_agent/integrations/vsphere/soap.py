"""SOAP calls whose answer the agent parses itself (see :mod:`.properties`).

pyVmomi's ``stub.InvokeMethod`` always deserializes the answer into pyVmomi objects; it offers no
way to get the answer's bytes. :func:`invoke_raw` therefore sends the request pyVmomi serialized,
over pyVmomi's own connection pool with its session cookie, and returns the raw (decompressed)
answer; a SOAP fault is still deserialized by pyVmomi and raised as its exception class. This is
the only hand-written HTTP of the integration, and it exists only to feed the property parser.
"""
from __future__ import annotations

import http.client
import io
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyVmomi import SoapAdapter

from vma_agent.integrations.vsphere.faults import VSphereFault

VIM_NS = "{urn:vim25}"
SOAP_BODY = "{http://schemas.xmlsoap.org/soap/envelope/}Body"


@dataclass
class Connection:
    """One login: pyVmomi's SOAP stub (cookie, connection pool), the service content, and a
    generation number that tells whether another thread logged in again meanwhile."""

    stub: Any
    content: Any
    generation: int


def invoke_raw(stub: Any, mo: Any, method: str, args: Sequence[Any]) -> bytes:
    """Invoke ``method`` on ``mo`` through pyVmomi's connection pool and return the raw SOAP
    answer. Faults are deserialized by pyVmomi and raised as its exception classes."""
    info = mo._GetMethodInfo(method)
    body = stub.SerializeRequest(mo, info, list(args))
    headers = {
        "Cookie": stub.cookie,
        "SOAPAction": stub.versionId,
        "Content-Type": "text/xml; charset=UTF-8",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": "vma-agent (pyVmomi)",
    }
    conn = stub.GetConnection()
    try:
        conn.request("POST", stub.path, body, headers)
        resp = conn.getresponse()
        status = resp.status
        if status not in (200, 500):
            resp.read()
            raise http.client.HTTPException(f"HTTP {status} {resp.reason}")
        encoding = (resp.getheader("Content-Encoding") or "identity").lower()
        inflate = None
        if encoding == "gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflate = zlib.decompressobj()
        kept: list[bytes] = []
        while True:
            chunk = resp.read(1 << 18)
            if not chunk:
                break
            kept.append(inflate.decompress(chunk) if inflate is not None else chunk)
        if inflate is not None:
            kept.append(inflate.flush())
    except BaseException:
        conn.close()
        stub.DropConnections()
        raise
    cookie = resp.getheader("Set-Cookie")
    if cookie:
        stub.cookie = cookie
    stub.ReturnConnection(conn)
    data = b"".join(kept)
    if status == 500:
        fault = SoapAdapter.SoapResponseDeserializer(stub).Deserialize(io.BytesIO(data), info.result)
        if isinstance(fault, BaseException):
            raise fault
        raise VSphereFault(f"unexpected SOAP fault answer to {method}")
    return data


def response_element(data: bytes, method: str) -> ET.Element:
    """The ``<method>Response`` element of a SOAP answer (ElementTree)."""
    root = ET.fromstring(data)
    soap_body = root.find(SOAP_BODY)
    if soap_body is None or len(soap_body) == 0:
        raise VSphereFault(f"malformed answer to {method} (no SOAP body)")
    return soap_body[0]


def invoke_xml(stub: Any, mo: Any, method: str, args: Sequence[Any]) -> ET.Element:
    return response_element(invoke_raw(stub, mo, method, args), method)
