"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

The driver is given explicitly, so Selenium Manager never looks for one on
the network; Chromium trusts the controller's certificate by its public key
alone (``--ignore-certificate-errors-spki-list``), not by ignoring TLS errors.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Seconds a page may take to load, and an element to appear: the two cores are shared.
PAGE_TIMEOUT = 30
ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        "--window-size=1400,1000")


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install {package}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: apt-get install python3-selenium (or pip install selenium)"
    return None


def spki_pin(host: str, port: int) -> str:
    """base64 SHA-256 of the SubjectPublicKeyInfo of the certificate ``host:port`` presents."""
    pem = ssl.get_server_certificate((host, port))
    spki = x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chromium(pin: str) -> Iterator[Any]:
    """A fresh headless Chromium (own profile directory) trusting the key ``pin``, quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager, should it run at all, stays offline
    profile = tempfile.mkdtemp(prefix="outpost-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (*ARGS, f"--user-data-dir={profile}", f"--ignore-certificate-errors-spki-list={pin}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
