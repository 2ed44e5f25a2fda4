"""CloudStack settings and OSSEA configuration against the CloudStack emulator (mapping: POST
/settings/cloudstack/* reads/writes ossea_configs, is_active toggles, detect OMA VM may record
ossea_configs.oma_vm_id; POST /ossea/config writes ossea_configs; POST /ossea/discover-resources reads
OSSEA; POST /ossea/config-streamlined writes ossea_configs; GET /service-offerings/available reads
OSSEA with no DB write)."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from oma.v1 import cloudstack_settings_pb2 as cs_pb
from oma.v1 import network_mappings_pb2 as nm_pb
from oma.v1 import ossea_config_pb2 as pb

from oma_server.db import models
from oma_server.domain.crypto import slot_of
from tests import factories


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _config(oma, cloudstack, **kw):
    values = dict(name="lab", api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key,
                  zone="zone-a", disk_offering_id=cloudstack.disk_offering_id)
    values.update(kw)
    return oma.ossea.CreateConfig(pb.CreateConfigRequest(**values), timeout=10).config


def test_config_crud_encrypts_keys_and_exactly_one_is_active(oma, oma_server, cloudstack):
    first = _config(oma, cloudstack)
    row = models.OsseaConfig.get_by_id(first.id)
    assert row.api_key.startswith("enc:v2:") and row.secret_key.startswith("enc:v2:")
    slot = slot_of(models.OsseaConfig.secret_key, row.id)
    assert oma_server.runtime.secrets.decrypt(row.secret_key, slot) == cloudstack.secret_key
    text = json_format.MessageToJson(first)
    assert cloudstack.secret_key not in text and cloudstack.api_key not in text
    assert first.api_key_hint == "…" + cloudstack.api_key[-4:] and first.is_active

    second = _config(oma, cloudstack, name="dr", zone="zone-b")
    active = [c.name for c in models.OsseaConfig.select().where(models.OsseaConfig.is_active)]
    assert active == ["dr"]
    assert oma.ossea.GetConfig(pb.GetConfigRequest(), timeout=5).config.id == second.id  # id 0 → active

    oma.ossea.ActivateConfig(pb.ActivateConfigRequest(id=first.id), timeout=5)
    assert [c.name for c in models.OsseaConfig.select().where(models.OsseaConfig.is_active)] == ["lab"]

    # A partial update keeps the stored secret.
    before = models.OsseaConfig.get_by_id(first.id).secret_key
    oma.ossea.UpdateConfig(pb.UpdateConfigRequest(id=first.id, oma_vm_id=cloudstack.oma_vm_id), timeout=5)
    row = models.OsseaConfig.get_by_id(first.id)
    assert row.secret_key == before and row.oma_vm_id == cloudstack.oma_vm_id

    listed = oma.ossea.ListConfigs(pb.ListConfigsRequest(include_inactive=True), timeout=5).configs
    assert [c.name for c in listed] == ["lab", "dr"]
    oma.ossea.DeleteConfig(pb.DeleteConfigRequest(id=second.id, purge=True), timeout=5)
    assert models.OsseaConfig.select().count() == 1


def test_config_bad_input_changes_nothing(oma, cloudstack):
    existing = _config(oma, cloudstack)
    for kw, code in ((dict(name="lab"), grpc.StatusCode.ALREADY_EXISTS),
                     (dict(name="x", api_url="ftp://x"), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(name="x", secret_key=""), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(name="", zone=""), grpc.StatusCode.INVALID_ARGUMENT)):
        assert _error(lambda: _config(oma, cloudstack, **kw))[0] == code
    assert models.OsseaConfig.select().count() == 1
    assert _error(lambda: oma.ossea.UpdateConfig(pb.UpdateConfigRequest(id=existing.id, api_key=""), timeout=5))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _error(lambda: oma.ossea.GetConfig(pb.GetConfigRequest(id=999), timeout=5))[0] == grpc.StatusCode.NOT_FOUND


def test_test_connection_and_test_config(oma, cloudstack):
    ok = oma.cloudstack.TestConnection(cs_pb.TestConnectionRequest(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key), timeout=10)
    assert ok.success and ok.zone_count == 2 and "Found 2 zone(s)" in ok.message
    bad = oma.cloudstack.TestConnection(cs_pb.TestConnectionRequest(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key="wrong"), timeout=10)
    assert not bad.success and "Authentication failed" in bad.error and "wrong" not in bad.error
    down = oma.cloudstack.TestConnection(cs_pb.TestConnectionRequest(
        api_url="http://127.0.0.1:9/client/api", api_key="k", secret_key="s"), timeout=30)
    assert not down.success and "Cannot reach CloudStack" in down.error

    config = _config(oma, cloudstack, zone=cloudstack.zone_id)  # zone by id …
    tested = oma.ossea.TestConfig(pb.TestConfigRequest(id=config.id), timeout=10)
    assert tested.success and tested.zone_name == "zone-a"
    by_name = oma.ossea.TestConfig(pb.TestConfigRequest(settings=pb.OSSEAConnectionSettings(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key, zone="zone-b")),
        timeout=10)  # … or by name
    assert by_name.success and by_name.zone_id == cloudstack.zone2_id
    missing = oma.ossea.TestConfig(pb.TestConfigRequest(settings=pb.OSSEAConnectionSettings(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key, zone="nowhere")),
        timeout=10)
    assert not missing.success and sorted(missing.available_zones) == ["zone-a", "zone-b"]


def test_detect_oma_vm_by_mac_and_persist(oma, cloudstack):
    request = dict(api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key)
    found = oma.cloudstack.DetectOMAVM(cs_pb.DetectOMAVMRequest(**request), timeout=10)
    assert found.success and found.oma_info.vm_id == cloudstack.oma_vm_id and not found.persisted
    assert models.OsseaConfig.select().count() == 0  # read-only without persist
    config = _config(oma, cloudstack)
    assert models.OsseaConfig.get_by_id(config.id).oma_vm_id is None
    persisted = oma.cloudstack.DetectOMAVM(cs_pb.DetectOMAVMRequest(persist=True, **request), timeout=10)
    assert persisted.persisted and persisted.ossea_config_id == config.id
    assert models.OsseaConfig.get_by_id(config.id).oma_vm_id == cloudstack.oma_vm_id


@pytest.mark.cloudstack_emulator(oma_mac="02:00:00:00:00:99")
def test_detect_oma_vm_reports_no_match(oma, cloudstack):
    found = oma.cloudstack.DetectOMAVM(cs_pb.DetectOMAVMRequest(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key), timeout=10)
    assert not found.success and "OMA VM not found" in found.error


def test_validate_settings(oma, cloudstack):
    base = dict(api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key)
    good = oma.cloudstack.ValidateSettings(cs_pb.ValidateSettingsRequest(
        service_offering_id=cloudstack.service_offering_id, network_id=cloudstack.network_id, **base), timeout=10)
    assert good.success and good.result.overall_status == "pass"
    assert good.result.oma_vm_id == cloudstack.oma_vm_id and good.result.account_match.status == "pass"
    fixed = oma.cloudstack.ValidateSettings(cs_pb.ValidateSettingsRequest(
        service_offering_id=cloudstack.ids["service_offering_small"], **base), timeout=10)
    assert not fixed.success and fixed.result.compute_offering.status == "fail"
    assert fixed.result.network.status == "warning"


def test_discover_all_resources_and_discover_resources(oma, cloudstack):
    found = oma.cloudstack.DiscoverAllResources(cs_pb.DiscoverAllResourcesRequest(
        api_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key), timeout=10)
    assert found.oma_vm_id == cloudstack.oma_vm_id and len(found.zones) == 2
    template_ids = {t.id for t in found.templates}
    assert cloudstack.template_id in template_ids
    assert cloudstack.ids["template_large"] not in template_ids  # ≥ 2 GiB are left out
    assert cloudstack.ids["template_not_ready"] not in template_ids
    assert any(o.is_customized for o in found.service_offerings) and found.disk_offerings and found.networks

    # URL normalisation: scheme typo and missing /client/api are fixed.
    host = cloudstack.url.removeprefix("http://").removesuffix("/client/api")
    legacy = oma.ossea.DiscoverResources(pb.DiscoverResourcesRequest(
        base_url=f"http//{host}", api_key=cloudstack.api_key, secret_key=cloudstack.secret_key), timeout=10)
    assert legacy.success and len(legacy.zones) == 2 and legacy.domains[0].name == "ROOT"
    code, _ = _error(lambda: oma.ossea.DiscoverResources(pb.DiscoverResourcesRequest(
        base_url=host, api_key=cloudstack.api_key, secret_key="bad"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_streamlined_config_tests_then_saves_or_updates(oma, cloudstack):
    request = dict(base_url=cloudstack.url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key,
                   zone_id=cloudstack.zone_id, disk_offering_id=cloudstack.disk_offering_id,
                   oma_vm_id=cloudstack.oma_vm_id, domain_name="ROOT")
    saved = oma.ossea.SaveStreamlinedConfig(pb.SaveStreamlinedConfigRequest(**request), timeout=10)
    assert saved.created and saved.config.name == "production-ossea" and saved.config.zone == cloudstack.zone_id
    again = oma.ossea.SaveStreamlinedConfig(pb.SaveStreamlinedConfigRequest(
        **{**request, "template_id": cloudstack.template_id}), timeout=10)
    assert not again.created and models.OsseaConfig.select().count() == 1
    assert models.OsseaConfig.get().template_id == cloudstack.template_id
    code, _ = _error(lambda: oma.ossea.SaveStreamlinedConfig(pb.SaveStreamlinedConfigRequest(
        **{**request, "zone_id": "no-such-zone"}), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_network_lists_and_mapping_validation_use_the_active_config(oma, cloudstack):
    code, msg = _error(lambda: oma.network_mappings.ListAvailableNetworks(nm_pb.ListAvailableNetworksRequest(),
                                                                           timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no CloudStack configuration" in msg
    _config(oma, cloudstack)
    calls_before = dict(cloudstack.calls)
    networks = oma.network_mappings.ListAvailableNetworks(nm_pb.ListAvailableNetworksRequest(
        zone_id=cloudstack.zone_id), timeout=10).networks
    assert {n.name for n in networks} >= {"prod-network", "test-isolated-network"}
    resolved = oma.network_mappings.ResolveNetwork(nm_pb.ResolveNetworkRequest(network_name="prod-network"), timeout=10)
    assert resolved.network_id == cloudstack.network_id
    assert _error(lambda: oma.network_mappings.ResolveNetwork(
        nm_pb.ResolveNetworkRequest(network_name="nope"), timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    before = factories.db_snapshot()
    offerings = oma.network_mappings.ListServiceOfferings(nm_pb.ListServiceOfferingsRequest(), timeout=10)
    assert factories.db_snapshot() == before  # no DB write
    assert any(o.is_customized for o in offerings.service_offerings)
    assert cloudstack.calls.get("listNetworks", 0) > calls_before.get("listNetworks", 0)

    factories.context(vm_name="web01")
    valid = oma.network_mappings.CreateNetworkMapping(nm_pb.CreateNetworkMappingRequest(
        vm_id="web01", source_network_name="VM Network", destination_network_id=cloudstack.network_id), timeout=10)
    assert valid.network_mapping.validation_status == "valid"
    assert valid.network_mapping.destination_network_name == "prod-network"
    code, _ = _error(lambda: oma.network_mappings.CreateNetworkMapping(nm_pb.CreateNetworkMappingRequest(
        vm_id="web01", source_network_name="Backup", destination_network_id="no-such-network"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    assert models.NetworkMapping.select().count() == 1


# --- every URL the API accepts is parsed on input (issue 9, item 6) ------------------------------------
BAD_URLS = ["http://" + "a" * 64 + ".example/client/api", "http://cs.example:99999/client/api",
            "http://cs..example/client/api", "https://user:pw@cs.example/client/api", "ftp://cs.example/",
            "http://cs.example:port/client/api", "http://[::1/client/api", "http://" + "a." * 130 + "x/"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_unparseable_urls_are_invalid_argument_everywhere(oma, cloudstack, url):
    keys = dict(api_key=cloudstack.api_key, secret_key=cloudstack.secret_key)
    calls = [
        lambda: oma.cloudstack.TestConnection(cs_pb.TestConnectionRequest(api_url=url, **keys), timeout=30),
        lambda: oma.cloudstack.DetectOMAVM(cs_pb.DetectOMAVMRequest(api_url=url, **keys), timeout=30),
        lambda: oma.cloudstack.ValidateSettings(cs_pb.ValidateSettingsRequest(api_url=url, **keys), timeout=30),
        lambda: oma.cloudstack.DiscoverAllResources(cs_pb.DiscoverAllResourcesRequest(api_url=url, **keys),
                                                    timeout=30),
        lambda: oma.ossea.TestConfig(pb.TestConfigRequest(settings=pb.OSSEAConnectionSettings(api_url=url, zone="zone-a", **keys)),
                                     timeout=30),
        lambda: oma.ossea.DiscoverResources(pb.DiscoverResourcesRequest(base_url=url, **keys), timeout=30),
        lambda: oma.ossea.SaveStreamlinedConfig(pb.SaveStreamlinedConfigRequest(
            base_url=url, zone_id="zone-a", disk_offering_id=cloudstack.disk_offering_id, **keys), timeout=30),
        lambda: _config(oma, cloudstack, name="bad-url", api_url=url),
    ]
    for call in calls:
        code = factories.refused_without_writes(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (url, code)
    good = _config(oma, cloudstack)
    code = factories.refused_without_writes(lambda: oma.ossea.UpdateConfig(
        pb.UpdateConfigRequest(id=good.id, api_url=url), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_64_character_host_label_is_a_short_invalid_argument(oma, cloudstack):
    url = "http://" + "a" * 64 + ".example/client/api"
    code, msg = _error(lambda: oma.cloudstack.TestConnection(cs_pb.TestConnectionRequest(
        api_url=url, api_key=cloudstack.api_key, secret_key=cloudstack.secret_key), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host name" in msg and len(msg) < 400
