"""CloudStack ("OSSEA") configurations (ossea_configs): exactly one is active.

Secret and API keys are encrypted at rest; responses show only the last characters of the API key.
A CloudStack client is built per operation from the active configuration (never cached at start-up),
so edits apply at once.
"""
from __future__ import annotations

from typing import Any

from oma_server.db.database import database_proxy as db
from oma_server.db.models import OsseaConfig
from oma_server.domain import paging, text_rules
from oma_server.domain.crypto import SecretBox, slot_of
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, require
from oma_server.integrations.cloudstack import CloudStack, Endpoint

_REQUIRED = ("name", "api_url", "api_key", "secret_key", "zone")
_OPTIONAL = ("domain", "oma_vm_id", "template_id", "network_id", "service_offering_id", "disk_offering_id")


def active_config() -> OsseaConfig | None:
    return (OsseaConfig.select().where(OsseaConfig.is_active == True)  # noqa: E712
            .order_by(OsseaConfig.id.desc()).first())


def active_config_id() -> int | None:
    config = active_config()
    return config.id if config else None


def require_active() -> OsseaConfig:
    config = active_config()
    if config is None:
        raise FailedPrecondition("no CloudStack configuration is active; save one with OSSEAConfigService.CreateConfig")
    return config


def get(config_id: int) -> OsseaConfig:
    require(config_id > 0, "id is required")
    config = OsseaConfig.get_or_none(OsseaConfig.id == config_id)
    if config is None:
        raise NotFound(f"no CloudStack configuration with id {config_id}")
    return config


def _seal(box: SecretBox, config_id: int, column: str, value: str) -> str:
    return box.encrypt(value, slot_of(getattr(OsseaConfig, column), config_id))


def _open(box: SecretBox, config: OsseaConfig, column: str) -> str:
    return box.decrypt(getattr(config, column), slot_of(getattr(OsseaConfig, column), config.id))


def api_key_hint(config: OsseaConfig, box: SecretBox) -> str:
    try:
        key = _open(box, config, "api_key")
    except Exception:  # noqa: BLE001 - a hint is cosmetic; never fail a read for it
        return ""
    return f"…{key[-4:]}" if len(key) > 8 else "…"


def client(config: OsseaConfig, box: SecretBox, **options: Any) -> CloudStack:
    return CloudStack(Endpoint(config.api_url, _open(box, config, "api_key"), _open(box, config, "secret_key")),
                      **options)


def _validate_url(url: str) -> str:
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        raise InvalidArgument("api_url must start with http:// or https://")
    return text_rules.http_url(url, "api_url", max_chars=text_rules.URL_MAX_CHARS)


def create(box: SecretBox, values: dict[str, Any], *, activate: bool = True) -> OsseaConfig:
    missing = [k for k in _REQUIRED if not str(values.get(k) or "").strip()]
    if missing:
        raise InvalidArgument(f"missing required fields: {', '.join(missing)}")
    name = values["name"].strip()
    if OsseaConfig.select().where(OsseaConfig.name == name).exists():
        raise AlreadyExists(f"a CloudStack configuration named {quote(name)} already exists")
    text_rules.fit(OsseaConfig, {"name": name, "zone": values["zone"].strip(),
                                 **{k: values.get(k) or "" for k in _OPTIONAL}})
    row = {
        "name": name, "api_url": _validate_url(values["api_url"]), "api_key": "", "secret_key": "", "zone": values["zone"].strip(), "is_active": activate,
        **{k: (values.get(k) or None) for k in _OPTIONAL},
    }
    with db.atomic():
        config = OsseaConfig.create(**row)
        # The ciphertexts are bound to the row id, known only after the insert: the empty values never
        # leave this transaction.
        OsseaConfig.update(api_key=_seal(box, config.id, "api_key", values["api_key"]),
                           secret_key=_seal(box, config.id, "secret_key", values["secret_key"])).where(
            OsseaConfig.id == config.id).execute()
        if activate:
            OsseaConfig.update(is_active=False).where(OsseaConfig.id != config.id).execute()
    return get(config.id)


def update(box: SecretBox, config_id: int, changes: dict[str, Any]) -> OsseaConfig:
    config = get(config_id)
    values: dict[str, Any] = {}
    for key in _REQUIRED:
        if key in changes:
            value = str(changes[key] or "").strip()
            if not value:
                raise InvalidArgument(f"{key} cannot be empty")
            values[key] = value
    if "api_url" in values:
        values["api_url"] = _validate_url(values["api_url"])
    text_rules.fit(OsseaConfig, {k: v for k, v in {**changes, **values}.items()
                                 if k not in ("api_url", "api_key", "secret_key")})
    for secret in ("api_key", "secret_key"):
        if secret in values:
            values[secret] = _seal(box, config_id, secret, values[secret])
    for key in _OPTIONAL:
        if key in changes:
            values[key] = changes[key] or None
    if not values:
        raise InvalidArgument("no fields to update")
    if "name" in values and values["name"] != config.name and \
            OsseaConfig.select().where(OsseaConfig.name == values["name"]).exists():
        raise AlreadyExists(f"a CloudStack configuration named {quote(values['name'])} already exists")
    OsseaConfig.update(values).where(OsseaConfig.id == config_id).execute()
    return get(config_id)


def activate(config_id: int) -> OsseaConfig:
    with db.atomic():
        get(config_id)
        OsseaConfig.update(is_active=False).where(OsseaConfig.id != config_id).execute()
        OsseaConfig.update(is_active=True).where(OsseaConfig.id == config_id).execute()
    return get(config_id)


def deactivate_or_purge(config_id: int, purge: bool) -> OsseaConfig:
    config = get(config_id)
    if purge:
        config.delete_instance()
        return config
    OsseaConfig.update(is_active=False).where(OsseaConfig.id == config_id).execute()
    return get(config_id)



def list_configs(include_inactive: bool, page_size: int, page_token: str) -> paging.Page:
    """The configurations by id (only the active one unless ``include_inactive``), one page."""
    query = OsseaConfig.select()
    if not include_inactive:
        query = query.where(OsseaConfig.is_active == True)  # noqa: E712
    return paging.paginate(query.order_by(OsseaConfig.id), page_size, page_token)
