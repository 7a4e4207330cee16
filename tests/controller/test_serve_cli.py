"""`outpost-controller serve` as a real process: first start, restart, clean refusals."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from controller.ca import certificate_fingerprint

ROOT = Path(__file__).resolve().parents[2]
#: A first start generates two keys and a store; seconds on the slowest board.
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
READY_LINE = re.compile(
    r"^outpost-controller ready on https://127\.0\.0\.1:(\d+) "
    r"\(CA (sha256:[0-9a-f]{64}); outpostctl config: (/.+/outpostctl\.toml)\)$"
)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *args]


class Controller:
    """One `outpost-controller serve` process, stopped with SIGTERM."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            command("serve", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.line = self._read_ready_line()

    def _read_ready_line(self) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT)
        if not lines or not lines[0]:
            self.process.kill()
            _, err = self.process.communicate(timeout=EXIT_TIMEOUT)
            raise AssertionError(f"controller did not become ready: {err}")
        return lines[0].rstrip("\n")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        try:
            self.process.wait(EXIT_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.process.stdout.close()
            self.process.stderr.close()
        return self.process.returncode


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def api(url: str, ca: Path, token: str, path: str, body: dict | None = None) -> dict:
    tls = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=tls, timeout=10) as response:
        return json.loads(response.read())


def read_toml(path: Path) -> dict[str, str]:
    import tomllib

    return tomllib.loads(path.read_text())


def test_first_start_creates_the_data_directory_and_a_restart_reuses_it_both_stop_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Controller("--data", str(data), "--listen", "127.0.0.1:0")
    try:
        match = READY_LINE.match(first.line)
        assert match, first.line
        port, fingerprint, config_path = int(match[1]), match[2], Path(match[3])
        assert config_path == data.resolve() / "outpostctl.toml"
        assert port != 0
        assert mode(data) == 0o700
        for private in ("ca/ca.key", "tls/server.key", "admin.hash", "outpostctl.toml", "store.sqlite3"):
            assert mode(data / private) == 0o600, private
        assert not (data / "admin.token").exists()
        ca = x509.load_pem_x509_certificate((data / "ca/ca.pem").read_bytes())
        assert certificate_fingerprint(ca) == fingerprint
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca and constraints.path_length == 0
        config = read_toml(config_path)
        admin_token = config["token"]
        assert config == {"url": f"https://127.0.0.1:{port}", "ca": str(data.resolve() / "ca/ca.pem"), "token": admin_token}
        # The controller keeps a salted hash only: the plaintext is nowhere in its files but outpostctl.toml.
        assert admin_token not in (data / "admin.hash").read_text()
        operator = api(config["url"], Path(config["ca"]), admin_token, "/api/v1/identities/operator")
        assert (operator["tenant"], operator["roles"]) == ("default", ["operator"])
        created = api(config["url"], Path(config["ca"]), admin_token, "/api/v1/identities", {"name": "gw"})
        claims = json.loads(__import__("base64").urlsafe_b64decode(created["token"].split(".")[1] + "=="))
        assert claims["iss"] == f"https://127.0.0.1:{port}" and claims["ca"] == fingerprint
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            tls = ssl.create_default_context(cafile=config["ca"])
            with tls.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
                server = x509.load_der_x509_certificate(wrapped.getpeercert(binary_form=True))
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert x509.DNSName("localhost") in names and x509.DNSName(socket.gethostname().lower()) in names
    finally:
        assert first.stop() == 0
    kept = {p: p.read_bytes() for p in (data / "ca/ca.pem", data / "ca/ca.key", data / "tls/server.pem", data / "admin.hash")}

    second = Controller("--data", str(data), "--listen", "127.0.0.1:0")
    try:
        match = READY_LINE.match(second.line)
        assert match and match[2] == fingerprint
        assert {p: p.read_bytes() for p in kept} == kept
        config = read_toml(data / "outpostctl.toml")
        assert config["url"] == f"https://127.0.0.1:{match[1]}"
        names = [i["name"] for i in api(config["url"], Path(config["ca"]), config["token"], "/api/v1/identities")["identities"]]
        assert names == ["gw", "operator"]
    finally:
        assert second.stop(signal.SIGINT) == 0


def test_a_new_san_reissues_the_listener_certificate_and_keeps_the_ca(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Controller("--data", str(data), "--listen", "127.0.0.1:0").stop()
    ca_before = (data / "ca/ca.pem").read_bytes()
    extra = Controller(
        "--data", str(data), "--listen", "127.0.0.1:0", "--san", "gw.example.net",
        "--advertise", "https://controller.example:443",
    )
    try:
        assert extra.line.startswith("outpost-controller ready on https://controller.example:443 ")
        server = x509.load_pem_x509_certificate((data / "tls/server.pem").read_bytes())
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert x509.DNSName("gw.example.net") in names and x509.DNSName("controller.example") in names
        assert (data / "ca/ca.pem").read_bytes() == ca_before
    finally:
        assert extra.stop() == 0


def run_failing(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=EXIT_TIMEOUT)


def assert_one_sentence(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].endswith(".") and "Traceback" not in stderr


def test_a_port_in_use_is_one_sentence_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_failing("serve", "--data", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert_one_sentence(result.stderr)
    assert "already in use" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "HOST:PORT"),
        (["--cert-lifetime", "5"], "--cert-lifetime"),
        (["--relay-cert-lifetime", "5"], "--relay-cert-lifetime"),
        (["--relay-cert-lifetime", "172800"], "--relay-cert-lifetime"),
        (["--token-ttl", "soon"], "invalid int"),
        (["--advertise", "http://x"], "--advertise"),
        (["--san", "bad name"], "--san"),
        (["--trust-domain", "Bad_Domain"], "--trust-domain"),
        (["--no-such-flag"], "unrecognized"),
        (["--api-listen", "nowhere"], "--api-listen"),
        (["--metrics-listen", "nowhere"], "--metrics-listen"),
        (["--max-unauthenticated", "0"], "--max-unauthenticated"),
        (["--max-unauthenticated-per-address", "-1"], "--max-unauthenticated-per-address"),
        (["--event-loop", "tokio"], "invalid choice"),
    ],
)
def test_a_bad_flag_is_one_sentence_exit_64_and_creates_nothing(tmp_path: Path, flags: list[str], phrase: str) -> None:
    result = run_failing("serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0", *flags)
    assert result.returncode == 64
    assert_one_sentence(result.stderr)
    assert phrase in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_data_directory_that_cannot_be_created_is_one_sentence_and_creates_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_failing("serve", "--data", str(blocker / "data"), "--listen", "127.0.0.1:0")
    assert result.returncode != 0
    assert_one_sentence(result.stderr)
    assert "data directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_an_incomplete_data_directory_is_refused_not_repaired(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.sqlite3").write_bytes(b"")
    result = run_failing("serve", "--data", str(data), "--listen", "127.0.0.1:0")
    assert result.returncode != 0
    assert_one_sentence(result.stderr)
    assert "incomplete" in result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["store.sqlite3"]


def test_api_listen_moves_the_management_api_to_its_own_port_and_into_outpostctl_toml(tmp_path: Path) -> None:
    data = tmp_path / "data"
    controller = Controller("--data", str(data), "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0")
    try:
        match = re.match(r"^outpost-controller ready on https://127\.0\.0\.1:(\d+) .*; management API on "
                         r"https://127\.0\.0\.1:(\d+)$", controller.line)
        assert match, controller.line
        public, api_port = int(match[1]), int(match[2])
        assert public != api_port
        config = read_toml(data / "outpostctl.toml")
        assert config["url"] == f"https://127.0.0.1:{api_port}"
        assert api(config["url"], Path(config["ca"]), config["token"], "/api/v1/identities/operator")["name"] == "operator"
        try:
            api(f"https://127.0.0.1:{public}", Path(config["ca"]), config["token"], "/api/v1/identities/operator")
            raise AssertionError("the public listener served the management API")
        except urllib.error.HTTPError as error:
            assert error.code == 404
    finally:
        assert controller.stop() == 0


def test_api_listen_on_the_same_address_as_listen_is_one_sentence(tmp_path: Path) -> None:
    result = run_failing("serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:8443",
                         "--api-listen", "127.0.0.1:8443")
    assert result.returncode == 64
    assert_one_sentence(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_metrics_listen_on_the_same_address_as_listen_is_one_sentence(tmp_path: Path) -> None:
    result = run_failing("serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:8443",
                         "--metrics-listen", "127.0.0.1:8443")
    assert result.returncode == 64
    assert_one_sentence(result.stderr)
    assert "--metrics-listen must differ" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_metrics_listen_serves_metrics_on_its_own_port_and_says_where(tmp_path: Path) -> None:
    data = tmp_path / "data"
    controller = Controller("--data", str(data), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    try:
        match = re.search(r"; metrics on https://127\.0\.0\.1:(\d+)/metrics for the bearer of (\S+)$", controller.line)
        assert match, controller.line
        assert Path(match[2]) == data / "metrics.token"
        token = (data / "metrics.token").read_text().strip()
        request = urllib.request.Request(f"https://127.0.0.1:{match[1]}/metrics",
                                         headers={"Authorization": f"Bearer {token}"})
        context = ssl.create_default_context(cafile=str(data / "ca" / "ca.pem"))
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            assert b"outpost_identities" in response.read()
    finally:
        assert controller.stop() == 0
