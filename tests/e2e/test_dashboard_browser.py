"""The dashboard in a real headless Chromium against a real controller with real agents.

Each page is loaded and what it shows is checked: names and presence, a
filter, a sort, a gateway's page, a connection, the audit trail's
verification, the policies' decision counts; login, a forged CSRF token,
logout. Screenshots go to the test's tmp directory (the path is printed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.browser import PAGE_TIMEOUT, chromium, missing, screenshot, spki_pin
from tests.e2e.harness import Controller, EchoServer, admin_token_in, free_port, round_trip, wait_until
from tests.e2e.test_audit_connections import settled
from tests.e2e.test_walking_skeleton import enroll_gateway, start_agent

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture
def browser(controller: Controller) -> Iterator[Any]:
    """A fresh headless Chromium that trusts this controller's key (and nothing else it would not)."""
    where = urlsplit(controller.url)
    with chromium(spki_pin(where.hostname or "127.0.0.1", where.port or 443)) as driver:
        yield driver


def names_in(driver, table: str = "fleet") -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.find_elements(By.TAG_NAME, "td")[0].text
            for row in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")]


def test_every_page_in_chromium(controller: Controller, echo_server: EchoServer, browser: Any,
                                tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    controller.ctl("service", "create", "telemetry")
    controller.ctl("policy", "create", "--kind", "bind", "--identities", "site-a", "--services", "telemetry")
    controller.ctl("policy", "create", "--kind", "dial", "--identities", "central", "--services", "telemetry")
    controller.ctl("identity", "create", "gw-never", "--token-out", str(tmp_path / "never.token"))
    host = start_agent(tmp_path, "site-a", enroll_gateway(controller, tmp_path, "site-a", "gateway"),
                       binds={"telemetry": echo_server.port})
    port = free_port()
    dialer = start_agent(tmp_path, "central", enroll_gateway(controller, tmp_path, "central"),
                         dials={"telemetry": port})
    shots = tmp_path / "screenshots"
    print(f"\nscreenshots: {shots}")
    try:
        assert round_trip(port, b"hello") == b"hello"
        dial = settled(controller, "closed")
        url = controller.url.rstrip("/")
        driver = browser
        wait = WebDriverWait(driver, PAGE_TIMEOUT)
        # Without a session: the one sentence, then the login form.
        driver.get(url + "/ui/fleet")
        assert "You are not logged in to the dashboard" in driver.find_element(By.ID, "error").text
        driver.get(url + "/ui/")
        wait.until(ready.presence_of_element_located((By.ID, "login")))
        screenshot(driver, shots, "login")
        driver.find_element(By.ID, "token").send_keys(admin_token_in(controller.data))
        driver.find_element(By.ID, "submit").click()
        wait.until(ready.presence_of_element_located((By.ID, "fleet")))
        cookie = driver.get_cookie("outpost_ui")
        assert cookie is not None and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        # The fleet: who is there, and how each is; presence is reported at the agents' pace.
        def rows() -> dict[str, list[str]]:
            return {cells[0]: cells for cells in (
                [td.text for td in row.find_elements(By.TAG_NAME, "td")]
                for row in driver.find_elements(By.CSS_SELECTOR, "#fleet tbody tr"))}

        def reported() -> dict[str, list[str]] | None:
            driver.get(url + "/ui/fleet")
            found = rows()
            return found if found.get("site-a", [""] * 7)[6] else None

        fleet = wait_until(reported, timeout=PAGE_TIMEOUT, interval=1.0, what="site-a's report on the fleet page")
        assert set(fleet) >= {"site-a", "central", "gw-never", "operator"}
        assert fleet["site-a"][2] == "online" and fleet["central"][2] == "online"
        assert fleet["gw-never"][2] == "never" and fleet["gw-never"][3] == ""
        assert fleet["site-a"][9] == "software" and fleet["site-a"][7]  # key backend, certificate expiry
        assert "2 online" in driver.find_element(By.ID, "summary").text
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-refresh") == "30"
        screenshot(driver, shots, "fleet")
        # A filter: the gateways that never connected.
        Select(driver.find_element(By.ID, "filter-presence")).select_by_value("never")
        driver.find_element(By.ID, "apply").click()
        wait.until(ready.url_contains("presence=never"))
        assert set(names_in(driver)) == {"gw-never", "operator"}
        screenshot(driver, shots, "fleet-never")
        # A sort: by name, then the other way.
        driver.get(url + "/ui/fleet")
        driver.find_element(By.ID, "sort-name").click()  # name is the default: this turns it around
        wait.until(ready.url_contains("order=desc"))
        descending = names_in(driver)
        assert descending == sorted(descending, reverse=True) and len(descending) == 4
        driver.find_element(By.ID, "sort-name").click()
        wait.until(ready.url_contains("order=asc"))
        assert names_in(driver) == sorted(descending)
        # One gateway's page: its report, its tunnel, its audit events.
        driver.find_element(By.LINK_TEXT, "site-a").click()
        wait.until(ready.presence_of_element_located((By.ID, "report")))
        report = driver.find_element(By.ID, "report").text
        assert "presence\nonline" in report and "key backend\nsoftware" in report
        assert len(driver.find_elements(By.CSS_SELECTOR, "#tunnels tbody tr")) == 1
        assert "telemetry" in driver.find_element(By.ID, "tunnels").text
        assert "enrollment" in driver.find_element(By.ID, "audit").text
        served = driver.find_element(By.ID, "served").text  # the dial central made, served by site-a
        assert dial["id"] in served and "default/central" in served
        screenshot(driver, shots, "gateway")
        # Connections: the dial, through its policy, with its bytes.
        driver.find_element(By.LINK_TEXT, "Connections").click()
        wait.until(ready.presence_of_element_located((By.ID, "connections")))
        table = driver.find_element(By.ID, "connections").text
        assert dial["id"] in table and "default/central" in table and "closed" in table
        screenshot(driver, shots, "connections")
        # The audit trail and its verification.
        driver.find_element(By.LINK_TEXT, "Audit").click()
        state = wait.until(ready.presence_of_element_located((By.ID, "verification")))
        assert "verified" in state.get_attribute("class") and "the chain is whole" in state.text
        assert "dashboard_login" in driver.find_element(By.ID, "audit").text
        screenshot(driver, shots, "audit")
        # Policies and how many decisions each made.
        driver.find_element(By.LINK_TEXT, "Policies").click()
        wait.until(ready.presence_of_element_located((By.ID, "policies")))
        counts = {row.find_elements(By.TAG_NAME, "td")[1].text: int(row.find_element(By.CLASS_NAME,
                                                                                    "decisions").text)
                  for row in driver.find_elements(By.CSS_SELECTOR, "#policies tbody tr")}
        assert counts["dial"] >= 1 and counts["bind"] >= 1
        screenshot(driver, shots, "policies")
        # A forged CSRF token on logout is refused in one sentence; the session lives on.
        driver.execute_script("document.querySelector('#logout input[name=csrf]').value = 'forged';")
        driver.find_element(By.CSS_SELECTOR, "#logout button").click()
        error = wait.until(ready.presence_of_element_located((By.ID, "error")))
        assert "CSRF token is missing or forged" in error.text
        screenshot(driver, shots, "csrf-refused")
        driver.get(url + "/ui/policies")
        driver.find_element(By.CSS_SELECTOR, "#logout button").click()
        wait.until(ready.presence_of_element_located((By.ID, "login")))
        assert driver.get_cookie("outpost_ui") is None
        driver.get(url + "/ui/audit")
        assert "You are not logged in" in driver.find_element(By.ID, "error").text
        assert sorted(p.name for p in shots.iterdir()) == sorted(
            f"{n}.png" for n in ("login", "fleet", "fleet-never", "gateway", "connections", "audit", "policies",
                                 "csrf-refused"))
        assert all(os.path.getsize(p) > 1000 for p in shots.iterdir())
    finally:
        dialer.stop()
        host.stop()
