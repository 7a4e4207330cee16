"""The agent config file: typed values out, one sentence per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_STATE_DIR,
    AgentConfig,
    BindConfig,
    DialConfig,
    LinkSettings,
)
from agent.config_file import load_config
from agent.errors import ConfigError
from agent.identity.select import KeyStoreSettings

FULL = """
state_dir = "/srv/outpost"
log_level = "debug"
event_loop = "asyncio"

[keystore]
backend = "tpm"
tcti = "swtpm:host=127.0.0.1,port=2321"

[link]
profile = "satellite"
keepalive_interval = 25
ping_timeout = 12.5

[[bind]]
service = "modbus"
target = "127.0.0.1:502"

[[bind]]
service = "opc-ua"
target = "[::1]:4840"

[[dial]]
service = "historian"
listen = "127.0.0.1:9000"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_full_config_becomes_typed_frozen_values(tmp_path: Path):
    config = load_config(write(tmp_path, FULL))

    assert config == AgentConfig(
        state_dir=Path("/srv/outpost"),
        keystore=KeyStoreSettings(backend="tpm", tcti="swtpm:host=127.0.0.1,port=2321"),
        binds=(BindConfig("modbus", "127.0.0.1", 502), BindConfig("opc-ua", "::1", 4840)),
        dials=(DialConfig("historian", "127.0.0.1", 9000),),
        link=LinkSettings(profile="satellite", keepalive_interval=25.0, ping_timeout=12.5),
        log_level="debug",
        event_loop="asyncio",
    )
    with pytest.raises(AttributeError):
        config.log_level = "info"  # type: ignore[misc]


def test_a_dial_may_name_a_service_of_another_tenant(tmp_path: Path):
    config = load_config(write(tmp_path, '[[dial]]\nservice = "acme/scada"\nlisten = "127.0.0.1:9001"\n'))

    assert config.dials == (DialConfig("acme/scada", "127.0.0.1", 9001),)


def test_a_bind_maps_each_declared_port_to_its_own_target(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[bind]]\nservice = "plc"\ntarget = "127.0.0.1:502"\n'
                                         'ports = { 502 = "127.0.0.1:502", 1502 = "[::1]:1502" }\n'))
    assert config.binds[0].ports == ((502, "127.0.0.1", 502), (1502, "::1", 1502))
    with pytest.raises(ConfigError, match="each key is a port"):
        load_config(write(tmp_path, '[[bind]]\nservice = "plc"\ntarget = "127.0.0.1:502"\nports = { x = "a:1" }\n'))
    config = load_config(write(tmp_path, '[[dial]]\nservice = "plc:1502@gw-1"\nlisten = "127.0.0.1:9001"\n'))
    assert config.dials[0].service == "plc:1502@gw-1"


def test_a_dial_may_be_aimed_at_one_gateway(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[dial]]\nservice = "modbus@gw-0042"\nlisten = "127.0.0.1:9001"\n'))
    assert config.dials == (DialConfig("modbus@gw-0042", "127.0.0.1", 9001),)
    with pytest.raises(ConfigError, match="before a gateway as"):
        load_config(write(tmp_path, '[[dial]]\nservice = "modbus@GW"\nlisten = "127.0.0.1:9001"\n'))


def test_an_empty_file_gives_the_defaults(tmp_path: Path):
    config = load_config(write(tmp_path, ""))

    assert config == AgentConfig()
    assert config.event_loop == "auto"
    assert config.state_dir == DEFAULT_STATE_DIR == Path("/var/lib/outpost-agent")
    assert config.keystore == KeyStoreSettings(backend="auto", tcti="device:/dev/tpmrm0")


def test_a_relative_state_dir_is_relative_to_the_file(tmp_path: Path):
    config = load_config(write(tmp_path, 'state_dir = "state"\n'))

    assert config.state_dir == tmp_path.resolve() / "state"


@pytest.mark.parametrize("text, key, advice", [
    ('colour = "blue"\n', "'colour' is not a setting", "remove it"),
    ('[keystore]\nbackend = "hsm"\n', "'keystore.backend' must be one of auto, tpm, software", "not 'hsm'"),
    ('[keystore]\ntcti = "usb:/dev/tpm9"\n', "keystore.tcti 'usb:/dev/tpm9' is not a TCTI string", "use for example"),
    ('[keystore]\npin = 1\n', "'keystore.pin' is not a setting", "backend, tcti"),
    ('[[bind]]\nservice = "modbus"\ntarget = "127.0.0.1"\n', "'bind[0].target' is '127.0.0.1'", 'give it as "host:port"'),
    ('[[bind]]\nservice = "modbus"\ntarget = "127.0.0.1:70000"\n', "'bind[0].target' has port 70000", "outside 1-65535"),
    ('[[bind]]\nservice = "modbus"\ntarget = "127.0.0.1:0"\n', "'bind[0].target' has port 0", "fix the port"),
    ('[[bind]]\ntarget = "127.0.0.1:502"\n', "'bind[0].service' is missing", "name the service"),
    ('[[bind]]\nservice = "Mod Bus"\ntarget = "127.0.0.1:502"\n', "'bind[0].service' is 'Mod Bus'", "lowercase"),
    ('[[bind]]\nservice = "modbus"\ntarget = "a:1"\n[[bind]]\nservice = "modbus"\ntarget = "b:2"\n',
     "'bind[1].service' repeats 'modbus'", "bind each service once"),
    ('[[dial]]\nservice = "a"\nlisten = "127.0.0.1:9000"\n[[dial]]\nservice = "b"\nlisten = "127.0.0.1:9000"\n',
     "'dial[1].listen' repeats '127.0.0.1:9000'", "its own port"),
    ('[[dial]]\nservice = "a"\nport = 9000\n', "'dial[0].port' is not a setting", "listen, service"),
    ('[[dial]]\nservice = "a/b/c"\nlisten = "127.0.0.1:9000"\n', "'dial[0].service' is 'a/b/c'", '"acme/scada"'),
    ('[[dial]]\nservice = "Acme/scada"\nlisten = "127.0.0.1:9000"\n', "'dial[0].service'", "optionally after a tenant"),
    ('[[dial]]\nservice = "/scada"\nlisten = "127.0.0.1:9000"\n', "'dial[0].service' is '/scada'", "lowercase"),
    ('[[bind]]\nservice = "acme/scada"\ntarget = "127.0.0.1:502"\n', "'bind[0].service' is 'acme/scada'", "lowercase"),
    ('[link]\nprofile = "carrier-pigeon"\n', "'link.profile' must be one of", "ethernet"),
    ('[link]\nping_timeout = -1\n', "'link.ping_timeout' must be a number of seconds", "above 0"),
    ('[link]\nkeepalive_interval = "30s"\n', "'link.keepalive_interval' must be a number", "seconds"),
    ('log_level = "loud"\n', "'log_level' must be one of debug, info, warning, error", "loud"),
    ('event_loop = "trio"\n', "'event_loop' must be one of auto, uvloop, asyncio", "trio"),
    ('state_dir = 5\n', "'state_dir' must be a string", "quotes"),
    ('bind = "modbus"\n', "'bind' must be written as [[bind]] tables", "[[bind]]"),
    ('keystore = "tpm"\n', "'keystore' must be a table", "[keystore]"),
])
def test_every_bad_value_names_the_file_the_key_and_what_to_do(tmp_path: Path, text: str, key: str, advice: str):
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    sentence = str(caught.value)
    assert sentence.startswith(f"{path}: ")
    assert key in sentence and advice in sentence
    assert "\n" not in sentence
    assert caught.value.exit_code == 64


def test_invalid_toml_names_the_line(tmp_path: Path):
    path = write(tmp_path, 'log_level = "info"\n[keystore\nbackend = "tpm"\n')

    with pytest.raises(ConfigError, match=rf"^the config file {path} is not valid TOML: .*line 2"):
        load_config(path)


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=f"the config file {tmp_path / 'none.toml'} does not exist"):
        load_config(tmp_path / "none.toml")


def test_a_non_utf8_file_is_refused(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b'log_level = "\xff"\n')

    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


def test_more_binds_than_one_tunnel_carries_are_refused_at_load(tmp_path: Path):
    from shared.protocol import MAX_BIND_SERVICES

    entries = "".join(f'[[bind]]\nservice = "svc-{i}"\ntarget = "127.0.0.1:{1000 + i}"\n\n'
                      for i in range(MAX_BIND_SERVICES + 1))
    with pytest.raises(ConfigError, match=f"'bind' has {MAX_BIND_SERVICES + 1} entries; one tunnel binds at most "
                                          f"{MAX_BIND_SERVICES} services"):
        load_config(write(tmp_path, entries))
    exactly = "".join(f'[[bind]]\nservice = "svc-{i}"\ntarget = "127.0.0.1:{1000 + i}"\n\n'
                      for i in range(MAX_BIND_SERVICES))
    assert len(load_config(write(tmp_path, exactly)).binds) == MAX_BIND_SERVICES


def test_preferred_relays_are_read_and_a_bad_list_is_named(tmp_path: Path):
    config = load_config(write(tmp_path, '[link]\nprefer_relays = ["Relay-EU-1.example.net", "10.0.0.5:443"]\n'))
    assert config.link.prefer_relays == ("relay-eu-1.example.net", "10.0.0.5:443")
    assert load_config(write(tmp_path, "")).link.prefer_relays == ()
    for bad in ('"relay-eu-1"', '["wss://relay/v1/tunnel"]', '["two words"]', "[1]"):
        with pytest.raises(ConfigError, match=r"link.prefer_relays.*relay host names"):
            load_config(write(tmp_path, f"[link]\nprefer_relays = {bad}\n"))
