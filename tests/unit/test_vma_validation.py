"""The agent's input grammar (vma_agent.validation) and the one writer of ssh configurations
(vma_agent.integrations.ssh_tunnel.ssh_config_text), checked value by value; the writer's output is also
read back by OpenSSH itself (``ssh -G``) to prove a value never becomes a directive."""
from __future__ import annotations

import subprocess

import pytest

from vma_agent import errors, validation
from vma_agent.integrations import ssh_tunnel


def _refused(call, *args) -> str:
    with pytest.raises(validation.Invalid) as err:
        call(*args)
    assert isinstance(err.value, errors.InvalidArgument)  # INVALID_ARGUMENT on the wire
    return err.value.message


@pytest.mark.parametrize("name", ["vma_tunnel", "_x", "a", "a" * 32, "tunnel-1", "t_2"])
def test_user_names_accepted(name):
    assert validation.user_name("ssh_user", name) == name


@pytest.mark.parametrize("name", ["", "Root", "1abc", "-oProxyCommand=x", "a" * 33, "vma tunnel", "vma\n",
                                  "vma_tunnel\n    ProxyCommand id", "vma%h", "vmä", "a.b"])
def test_user_names_refused(name):
    assert _refused(validation.user_name, "ssh_user", name).startswith("ssh_user ")


@pytest.mark.parametrize("value", [1, 22, 65535])
def test_ports_accepted(value):
    assert validation.port("ssh_port", value) == value


@pytest.mark.parametrize("value", [0, -1, 65536, 70000, True, "22"])
def test_ports_refused(value):
    assert "must be a TCP port 1-65535" in _refused(validation.port, "ssh_port", value)


@pytest.mark.parametrize("value", ["127.0.0.1", "oma.example.com", "oma", "::1", "fe80::1", "my_host.lan",
                                   "a" * 63 + ".example"])
def test_hosts_accepted(value):
    assert validation.host("oma_host", value) == value


@pytest.mark.parametrize("value", ["", "-oProxyCommand=id", "oma host", "oma\nhost", "fe80::1%eth0", "1.2.3.999",
                                   "a..b", ".a", "a" * 64 + ".example", "x" * 254, "[::1]", "oma%h", "oma$x",
                                   "ex-.com.", "*"])
def test_hosts_refused(value):
    assert "must be a host name or an IP address" in _refused(validation.host, "oma_host", value)


@pytest.mark.parametrize(("value", "host", "port"), [
    ("127.0.0.1:10809", "127.0.0.1", 10809), ("[::1]:22", "::1", 22), ("oma.lan:9081", "oma.lan", 9081)])
def test_host_ports_accepted(value, host, port):
    parsed = validation.host_port("x", value)
    assert (parsed.host, parsed.port, str(parsed)) == (host, port, value)


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:", ":22", "*:*", "host:*", "::1:22", "[::1]22",
                                   "[oma]:22", "h:0", "h:65536", "h:1234567", "h:1\n", "h:١٢", "h :22"])
def test_host_ports_refused(value):
    assert _refused(validation.host_port, "permitopen", value).startswith("permitopen ")


def test_fingerprints():
    good = "SHA256:" + "Ab+/" * 10 + "xyz"
    assert validation.fingerprint("host_key_hash", good) == good
    for bad in ("", "SHA256:", good + "=", good + "\n", "MD5:" + good[7:], good[:-1], "sha256:" + good[7:]):
        assert "OpenSSH fingerprint" in _refused(validation.fingerprint, "host_key_hash", bad)


def test_identifiers():
    for good in ("job-20261207-231500.123-ab12cd", "j1", "disk-2000", "4c46873f-13dc-4a0b-896f-f81adc0457a4"):
        assert validation.identifier("job_id", good) == good
    assert _refused(validation.identifier, "job_id", "") == "job_id '' is not valid: is required"
    for bad in ("../x", "a/b", ".hidden", "a b", "a\nb", "-x", "é"):
        assert "may contain only" in _refused(validation.identifier, "job_id", bad)
    message = _refused(validation.identifier, "job_id", "x" * 1_000_000)
    assert message == f"job_id {'x' * 100!r}… (1000000 characters) is not valid: at most 128 characters (got 1000000)"


def test_text_limits_and_single_lines():
    assert validation.text("reason", "ok", 10) == "ok"
    assert "at most 10 characters (got 11)" in _refused(validation.text, "reason", "x" * 11, 10)
    assert "control characters" in _refused(validation.text, "reason", "a\nb", 10)
    assert validation.text("pem", "a\nb", 10, single_line=False) == "a\nb"


def test_challenge():
    import base64

    assert validation.challenge("challenge", base64.b64encode(b"c" * 32).decode()) == b"c" * 32
    for bad in ("", "***", base64.b64encode(b"c" * 8).decode(), base64.b64encode(b"c" * 65).decode()):
        assert "base64 of 16-64 bytes" in _refused(validation.challenge, "challenge", bad)


def test_oma_messages_are_cleaned_not_refused():
    assert validation.oma_message("line 1\nline 2\x00") == "line 1 line 2"
    assert validation.oma_message("x" * 5000) == "x" * 1000 + "…"


def test_ssh_options_of_the_oma():
    options = validation.parse_ssh_options("ssh_options", 'restrict,port-forwarding,permitopen="127.0.0.1:10809",'
                                                          'permitopen="[::1]:10810",permitlisten="127.0.0.1:9081"')
    assert [str(t) for t in options.permit_open] == ["127.0.0.1:10809", "[::1]:10810"]
    assert str(options.permit_listen) == "127.0.0.1:9081"
    assert str(validation.parse_ssh_options("o", 'permitlisten="9081"').permit_listen) == "127.0.0.1:9081"
    assert validation.parse_ssh_options("o", "") == validation.SshOptions((), None)
    for bad, said in [
        ('permitopen="127.0.0.1:1\n    ProxyCommand id"', "name or name=\"value\""),
        ('permitopen="a:1" ,restrict', "name or name=\"value\""),
        ('permitopen="a:1\\"', "name or name=\"value\""),
        ("proxycommand=\"id\"", "not an OpenSSH authorized_keys option"),
        ("restrict,permitlisten", "not an OpenSSH authorized_keys option"),
        ('permitopen="*:*"', "host:port"),
        ('permitlisten="a:2",permitlisten="b:4"', "more than one permitlisten"),
        ('permitlisten="999999"', "TCP port"),
        (",".join(["restrict"] * 5000), "at most 4096 options"),
        ('command="' + "x" * 2000 + '"', "at most 1024 characters"),
    ]:
        assert said in _refused(validation.parse_ssh_options, "ssh_options", bad), bad


def test_tunnel_parameters_must_agree():
    common = dict(ssh_user="vma_tunnel", ssh_port=443, host_key_hash="SHA256:" + "A" * 43)
    ok = validation.tunnel_parameters(**common, reverse_tunnel_port=9081,
                                      ssh_options='restrict,port-forwarding,permitlisten="127.0.0.1:9081"')
    assert str(ok.remote_forward) == "127.0.0.1:9081"
    assert str(validation.tunnel_parameters(**common, reverse_tunnel_port=9082, ssh_options="").remote_forward) == \
        "127.0.0.1:9082"
    message = _refused(lambda: validation.tunnel_parameters(
        **common, reverse_tunnel_port=9082, ssh_options='permitlisten="127.0.0.1:9081"'))
    assert message == ("ssh_options permitlisten '127.0.0.1:9081' is not valid: must be the reverse_tunnel_port "
                       "9082 the OMA assigned")


def _ssh_reads(config_text: str, tmp_path) -> dict[str, list[str]]:
    """What OpenSSH makes of a configuration (``ssh -G``: every option as it would use it)."""
    path = tmp_path / "config"
    path.write_text(config_text)
    out = subprocess.run(["ssh", "-G", "-F", str(path), ssh_tunnel.HOST_ALIAS], capture_output=True, text=True,
                         check=True).stdout
    parsed: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        parsed.setdefault(key, []).append(value)
    return parsed


def test_the_config_writer_quotes_escapes_and_ssh_reads_back_exactly_the_values(tmp_path):
    text = ssh_tunnel.ssh_config_text(["enrollment e-1"], [
        ("HostName", "oma.example"), ("User", "vma_tunnel"), ("Port", "2222"),
        ("IdentityFile", "/var/lib/vma agent/100%/id_ed25519"), ("ProxyCommand", "none"),
        ("LocalForward", "127.0.0.1:10809", "127.0.0.1:10809")])
    assert "    IdentityFile \"/var/lib/vma agent/100%%/id_ed25519\"\n" in text
    read = _ssh_reads(text, tmp_path)
    assert read["hostname"] == ["oma.example"] and read["user"] == ["vma_tunnel"] and read["port"] == ["2222"]
    # one argument despite the space; ssh expands %% to % when it opens the file (-G shows it unexpanded)
    assert read["identityfile"] == ["/var/lib/vma agent/100%%/id_ed25519"]
    assert read["localforward"] == ["[127.0.0.1]:10809 [127.0.0.1]:10809"]
    assert "proxycommand" not in read


@pytest.mark.parametrize(("directive", "value"), [
    ("User", "vma_tunnel\n    ProxyCommand id"), ("User", "a\rb"), ("HostName", 'oma" ProxyCommand "id'),
    ("HostName", "oma\\"), ("User", "%u"), ("IdentityFile", "${HOME}/key"), ("User", ""), ("User", "a\x00b"),
    ("User", "a\u2028b")])
def test_the_config_writer_refuses_values_that_could_add_a_directive(directive, value):
    with pytest.raises(ssh_tunnel.SshConfigError):
        ssh_tunnel.ssh_config_text([], [(directive, value)])


def test_the_config_writer_refuses_bad_directives_and_comments():
    for directives in ([("Proxy Command", "x")], [("user\n", "x")], [("User",)]):
        with pytest.raises(ssh_tunnel.SshConfigError):
            ssh_tunnel.ssh_config_text([], directives)
    with pytest.raises(ssh_tunnel.SshConfigError):
        ssh_tunnel.ssh_config_text(["fine\nProxyCommand id"], [])
