"""TCTI strings are checked by the agent before any TPM library sees them."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.identity.tcti import DEFAULT_TCTI, parse_tcti


@pytest.mark.parametrize(
    "text, name, conf",
    [
        ("device:/dev/tpmrm0", "device", "/dev/tpmrm0"),
        ("device:/dev/tpm0", "device", "/dev/tpm0"),
        ("swtpm:host=127.0.0.1,port=2321", "swtpm", "host=127.0.0.1,port=2321"),
        ("swtpm:port=4000", "swtpm", "host=localhost,port=4000"),
        ("swtpm:", "swtpm", "host=localhost,port=2321"),
        ("mssim:host=localhost,port=2321", "mssim", "host=localhost,port=2321"),
    ],
)
def test_valid_tcti_strings_parse_to_the_loader_name_and_configuration(text: str, name: str, conf: str) -> None:
    tcti = parse_tcti(text)
    assert (tcti.name, tcti.conf) == (name, conf)


def test_the_default_is_the_kernel_resource_manager() -> None:
    assert DEFAULT_TCTI == "device:/dev/tpmrm0"
    assert parse_tcti(DEFAULT_TCTI).device == "/dev/tpmrm0"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tpmrm0",
        "device",
        "device:",
        "device:tpmrm0",
        "device:/etc/passwd",
        "device:/dev/../etc/passwd",
        "swtpm:host=127.0.0.1,port=0",
        "swtpm:host=127.0.0.1,port=65535",
        "swtpm:host=127.0.0.1,port=99999",
        "swtpm:host=127.0.0.1,port=abc",
        "swtpm:host=,port=2321",
        "swtpm:host=a b,port=2321",
        "swtpm:port=1,port=2",
        "swtpm:127.0.0.1:2321",
        "swtpm:host=127.0.0.1;rm -rf /,port=2321",
        "tabrmd:bus_name=com.intel.tss2.Tabrmd",
        "libtss2-tcti-device.so.0:/dev/tpmrm0",
        "device:/dev/tpmrm0 ",
        "x" * 5000,
    ],
)
def test_a_tcti_string_that_does_not_parse_is_a_config_error_naming_a_valid_example(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tcti(text)
    message = str(caught.value)
    assert "device:/dev/tpmrm0" in message and "swtpm:host=127.0.0.1,port=2321" in message
    assert "\n" not in message and len(message) < 400
