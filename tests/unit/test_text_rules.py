"""The text rules on their own (oma_server/domain/text_rules.py): what passes, what is refused, and
how a caller's value is quoted back. The RPC-level behaviour is in test_bad_input_property.py."""
from __future__ import annotations

import pytest

from oma_server.db import models
from oma_server.domain import text_rules
from oma_server.errors import InvalidArgument


@pytest.mark.parametrize("value", ["web\x0001", "a\rb", "a\nb", "a\tb", "\x1b[31mred", "rtl\u202eexe", "zero\u200bwidth",
                                   "line\u2028sep", "ne\x85l", "private\ue000", "bom\ufeff"])
def test_names_refuse_control_and_invisible_characters(value):
    with pytest.raises(InvalidArgument, match="U\\+"):
        text_rules.name(value, models.VmMachineGroup.name)


def test_names_accept_printable_text_of_any_script_and_are_stripped():
    assert text_rules.name("  Wave 1 – Zoë/東京 (prod)  ", models.VmMachineGroup.name) == "Wave 1 – Zoë/東京 (prod)"


def test_limits_are_read_from_the_columns():
    assert text_rules.column_limit(models.ReplicationSchedule.timezone) == 50
    assert text_rules.column_limit(models.VmMachineGroup.description) == text_rules.TEXT_COLUMN_MAX_CHARS
    text_rules.name("z" * 50, models.ReplicationSchedule.timezone)
    with pytest.raises(InvalidArgument, match="51 characters long; at most 50"):
        text_rules.name("z" * 51, models.ReplicationSchedule.timezone)
    with pytest.raises(InvalidArgument, match="cron_expression"):
        text_rules.fit(models.ReplicationSchedule, {"cron_expression": "*" * 101, "enabled": True})


def test_free_text_keeps_line_feeds_and_tabs_only():
    assert text_rules.free_text("a\n\tb", models.VmMachineGroup.description) == "a\n\tb"
    for value in ("a\r\nb", "a\x1bb", "a\u202eb"):
        with pytest.raises(InvalidArgument):
            text_rules.free_text(value, models.VmMachineGroup.description)


@pytest.mark.parametrize("value", ["vc.example", "vc.example:443", "10.0.0.5:443", "[fd00::1]:8443", "fd00::1",
                                   "a" * 63 + ".example", "vcenter_01.lab.", "bücher.example"])
def test_valid_hosts(value):
    assert text_rules.host_port(value, "vcenter") == value


@pytest.mark.parametrize("value", ["a" * 64 + ".example", ("a" * 62 + ".") * 4 + "xy", "vc..lab", ".vc.lab",
                                   "-vc.lab", "vc-.lab", "vc.lab:0", "vc.lab:65536", "vc.lab:", "vc.lab:443x",
                                   "[fd00::1", "[fd00::1]443", "vc lab", "vc/lab", "vc@lab"])
def test_invalid_hosts(value):
    with pytest.raises(InvalidArgument):
        text_rules.host_port(value, "vcenter")


@pytest.mark.parametrize("value", ["http://cs.example/client/api", "https://10.0.0.1:8080/client/api",
                                   "https://[fd00::1]:8443/client/api"])
def test_valid_urls(value):
    assert text_rules.http_url(value, "api_url") == value


@pytest.mark.parametrize("value", ["http://" + "a" * 64 + ".example/", "ftp://cs.example/", "http:///client/api",
                                   "http://u:p@cs.example/", "http://cs.example:99999/", "http://cs.example:/",
                                   "http://cs example/", "http://cs.example/\tx", "cs.example/client/api"])
def test_invalid_urls(value):
    with pytest.raises(InvalidArgument):
        text_rules.http_url(value, "api_url")


def test_quote_shows_values_like_repr_but_never_more_than_the_limit():
    assert text_rules.quote("web-01") == "'web-01'" and text_rules.quote(None) == "None"
    assert text_rules.quote("a\x1b[2J") == "'a\\x1b[2J'"
    long = text_rules.quote("g" * 1_000_000)
    assert long.startswith("'" + "g" * 100 + "'…") and long.endswith("(1000000 characters)") and len(long) < 140


def test_the_status_mapping_bounds_every_message():
    """The safety net under the rules: whatever a domain error says, the status message the RPC layer
    sends stays far below gRPC's metadata limits."""
    from oma_server import rpc

    assert rpc.bounded_message("short") == "short"
    bounded = rpc.bounded_message("x" * 2_000_000)
    assert len(bounded) <= rpc.STATUS_MESSAGE_MAX_CHARS and bounded.endswith("(2000000 characters)")
