"""Service selectors and a dial's aim read ``SERVICE[:PORT][@GATEWAY]`` the same way (one split_aimed)."""

from __future__ import annotations

import pytest

from controller.errors import ControllerError
from controller.policy_selectors import Selector, parse_selector, split_aimed
from controller.relay.aiming import split_aim


def test_a_service_selector_names_its_port_and_gateway() -> None:
    parsed = parse_selector("acme/modbus:502@role:edge", "ops", aimed=True)
    assert parsed == Selector("acme", "modbus", False, gateway=Selector("ops", "edge", True), port=502)
    assert parsed.text("ops") == "acme/modbus:502@role:edge"
    assert parse_selector("modbus", "ops", aimed=True) == Selector("ops", "modbus", False)


@pytest.mark.parametrize(("text", "aimed", "message"), [
    ("modbus@gw", False, "The selector 'modbus@gw' names a gateway; only a service selector may"),
    ("modbus@gw@other", True, "The selector 'modbus@gw@other' names more than one gateway"),
    ("modbus:99999@gw", True, "The selector 'modbus:99999' names port 99999; a port is 1-65535."),
    ("modbus:0", True, "The selector 'modbus:0' names port 0; a port is 1-65535."),
])
def test_a_malformed_selector_is_refused_with_the_rule(text: str, aimed: bool, message: str) -> None:
    with pytest.raises(ControllerError) as caught:
        parse_selector(text, "ops", aimed=aimed)
    assert caught.value.code == "invalid_selector" and caught.value.message.startswith(message)


@pytest.mark.parametrize("text", ["modbus", "modbus:502", "acme/modbus@gw-1", "modbus:502@role:edge", "a:1:2@b@c", "@gw"])
def test_a_dial_aims_at_the_parts_a_selector_reads(text: str) -> None:
    service, port, gateway = split_aimed(text)
    assert split_aim(text, "ops") == (("acme", "modbus") if service == "acme/modbus" else ("ops", service),
                                      gateway, port)
