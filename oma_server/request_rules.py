"""The first check of every request: each string field, however deeply nested, against the text rules.

The RPC layer runs :func:`check_request` before a handler sees the request, so no RPC — existing or
added later — can take a megabyte id, a NUL or an ESC sequence into a lookup, a log line or an error
message. It is deliberately coarse (by field name, with bounds no column exceeds); the domain
modules then apply each column's own limit (``text_rules.name``/``fit``) where they write.

Field kinds, by name:

* secrets (passwords, keys, signatures): only bounded — their content is never shown or logged;
* ids (``id``, ``*_id``, ``*_ids``, ``page_token``): bounded to the widest id column, printable;
* free text (descriptions, notes, reasons, annotations): line feeds and tabs allowed;
* everything else: single-line printable text.
"""
from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from oma_server.domain import text_rules

SECRET_FIELDS = frozenset({"password", "current_password", "new_password", "api_key", "secret_key", "signature", "token",
                           "vma_public_key"})
FREE_TEXT_FIELDS = frozenset({"description", "notes", "reason", "error_message", "annotation"})
SECRET_MAX_CHARS = 16384
FREE_TEXT_MAX_CHARS = 65535
TEXT_MAX_CHARS = 4096


def _is_id(field_name: str) -> bool:
    return field_name in ("id", "page_token") or field_name.endswith(("_id", "_ids"))


def _check_string(field_name: str, path: str, value: str) -> None:
    if field_name in SECRET_FIELDS:
        if len(value) > SECRET_MAX_CHARS:
            text_rules.check(value, path, max_chars=SECRET_MAX_CHARS)
        return
    if _is_id(field_name):
        text_rules.identifier(value, path)
    elif field_name in FREE_TEXT_FIELDS:
        text_rules.check(value, path, max_chars=FREE_TEXT_MAX_CHARS, free_text=True)
    else:
        text_rules.check(value, path, max_chars=TEXT_MAX_CHARS)


def check_request(message: Message, prefix: str = "") -> None:
    """Raise InvalidArgument for the first string field of ``message`` the rules refuse."""
    for fd, value in message.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key_fd = fd.message_type.fields_by_name["key"]
            value_fd = fd.message_type.fields_by_name["value"]
            for key in value:
                if key_fd.type == FieldDescriptor.TYPE_STRING:
                    _check_string(fd.name, f"{path} key", key)
                item = value[key]
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    check_request(item, f"{path}[{text_rules.quote(key, 40)}].")
                elif value_fd.type == FieldDescriptor.TYPE_STRING:
                    _check_string(fd.name, f"{path}[{text_rules.quote(key, 40)}]", item)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                check_request(item, f"{path}[{i}]." if fd.is_repeated else f"{path}.")
        elif fd.type == FieldDescriptor.TYPE_STRING:
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                _check_string(fd.name, f"{path}[{i}]" if fd.is_repeated else path, item)
