"""A small synchronous client for the controller's management API (docs/api.md).

Standard library only (``http.client`` and ``ssl``): a one-shot command
should not pay for an event loop, and the TLS context trusts exactly one CA,
the controller's own, named in the config. Every failure ends as an
``OutpostError`` whose sentence says what happened and what to do.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from outpostctl.config import CtlConfig
from outpostctl.errors import ApiError, ControllerUnreachable, CredentialRefused, TrustError

#: Every management call is a small database operation; a controller that has
#: not answered in this long is stuck, and an operator at a shell wants to know.
REQUEST_TIMEOUT_SECONDS = 15.0
#: The largest answer read: ten thousand identities or audit events fit, and a
#: runaway or hostile server cannot exhaust the operator's memory.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH:
#: the certificate is the CA's, but for another name than the one in ``url``.
_NAME_MISMATCH_CODES = frozenset({62, 64})
API_PREFIX = "/api/v1"

JsonObject = dict[str, Any]


class ManagementClient:
    """The management API of one controller, one HTTPS request per call."""

    def __init__(self, config: CtlConfig, *, timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self._config = config
        self._timeout = timeout
        parts = urlsplit(config.url)
        self._host = parts.hostname or ""
        self._port = parts.port or 443
        self._tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def timeout(self) -> float:
        return self._timeout

    def with_timeout(self, timeout: float) -> ManagementClient:
        """The same controller, with requests that may take ``timeout`` seconds (a long poll)."""
        return ManagementClient(self._config, timeout=timeout)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                context = ssl.create_default_context(cafile=str(self._config.ca_path))
            except (ssl.SSLError, OSError) as error:
                raise TrustError(
                    f"cannot load the controller CA from {self._config.ca_path} ({error}); "
                    "point 'ca' in the config at the controller's ca/ca.pem"
                ) from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls = context
        return self._tls

    # -- identities ---------------------------------------------------------

    def create_identity(self, name: str, roles: list[str], tenant: str, ttl: int | None = None) -> JsonObject:
        """Create an identity; the answer holds ``identity``, ``token`` and ``token_expires``."""
        body: JsonObject = {"name": name, "roles": roles, "tenant": tenant}
        if ttl is not None:
            body["ttl"] = ttl
        return self.request("POST", "/identities", body)

    def list_identities(self, tenant: str | None = None) -> list[JsonObject]:
        """Every identity, or those of one tenant."""
        return list(self.request("GET", "/identities" + _tenant_query(tenant)).get("identities", []))

    def get_identity(self, name: str, tenant: str | None = None) -> JsonObject:
        """One identity; ``tenant`` None means the controller's default tenant."""
        return self.request("GET", _identity_path(name, "", tenant))

    def issue_token(self, name: str, ttl: int | None = None, tenant: str | None = None) -> JsonObject:
        """A new one-time enrollment token for ``name`` (``token``, ``token_expires``)."""
        body: JsonObject = {} if ttl is None else {"ttl": ttl}
        return self.request("POST", _identity_path(name, "/token", tenant), body)

    def revoke_identity(self, name: str, tenant: str | None = None) -> JsonObject:
        return self.request("POST", _identity_path(name, "/revoke", tenant), {})

    def disable_identity(self, name: str, tenant: str | None = None) -> JsonObject:
        return self.request("POST", _identity_path(name, "/disable", tenant), {})

    def enable_identity(self, name: str, tenant: str | None = None) -> JsonObject:
        return self.request("POST", _identity_path(name, "/enable", tenant), {})

    def session_certificate(self, name: str, csr_pem: str, tenant: str | None = None) -> JsonObject:
        """A short-lived certificate for ``name`` over ``csr_pem`` (audited by the controller)."""
        return self.request("POST", _identity_path(name, "/session", tenant), {"csr": csr_pem})

    # -- services, policies, audit, status ---------------------------------

    def create_service(self, name: str, roles: list[str], tenant: str, choose: str = "one",
                       ports: list[int] | None = None) -> JsonObject:
        body: JsonObject = {"name": name, "roles": roles, "tenant": tenant}
        if choose != "one":
            body["choose"] = choose
        if ports:
            body["ports"] = ports
        return self.request("POST", "/services", body)

    def list_services(self, tenant: str | None = None) -> list[JsonObject]:
        """Every service, or those of one tenant."""
        return list(self.request("GET", "/services" + _tenant_query(tenant)).get("services", []))

    def create_policy(self, kind: str, identities: list[str], services: list[str], tenant: str) -> JsonObject:
        body = {"kind": kind, "identities": identities, "services": services, "tenant": tenant}
        return self.request("POST", "/policies", body)

    def list_policies(self) -> list[JsonObject]:
        return list(self.request("GET", "/policies").get("policies", []))

    def audit(self, limit: int) -> list[JsonObject]:
        """The newest ``limit`` audit events, oldest first."""
        return list(self.request("GET", "/audit?" + urlencode({"limit": limit})).get("events", []))

    def status(self) -> JsonObject:
        return self.request("GET", "/status")

    # -- transport ----------------------------------------------------------

    def request(self, method: str, path: str, body: JsonObject | None = None) -> JsonObject:
        """Send one request under ``/api/v1`` and return the JSON object answered."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {
            "Authorization": f"Bearer {self._config.token}",
            "Accept": "application/json",
        }
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._tls_context()
        )
        try:
            connection.request(method, API_PREFIX + path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)
            status = response.status
        except ssl.SSLCertVerificationError as error:
            raise self._trust_error(error) from None
        except ssl.SSLError as error:
            raise ControllerUnreachable(
                f"the TLS connection to the controller at {self.url} failed ({error.reason or error}); "
                "check that url in the config is the controller's HTTPS address"
            ) from None
        except ConnectionRefusedError:
            raise ControllerUnreachable(
                f"cannot reach the controller at {self.url}: connection refused; is it running?"
            ) from None
        except TimeoutError:
            raise ControllerUnreachable(
                f"cannot reach the controller at {self.url}: no answer within "
                f"{self._timeout:g} seconds; is it running and is the address right?"
            ) from None
        except socket.gaierror as error:
            raise ControllerUnreachable(
                f"cannot reach the controller at {self.url}: the host name does not resolve ({error.strerror}); "
                "check url in the config"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise ControllerUnreachable(
                f"cannot reach the controller at {self.url}: {reason}; is it running?"
            ) from None
        finally:
            connection.close()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ApiError(f"the controller's answer is larger than {MAX_RESPONSE_BYTES} bytes; refused", status=status)
        return self._decode(status, raw)

    def _trust_error(self, error: ssl.SSLCertVerificationError) -> TrustError:
        if getattr(error, "verify_code", None) in _NAME_MISMATCH_CODES:
            return TrustError(
                f"the controller's certificate does not name the host in {self.url}; "
                "use the url the controller printed when it started"
            )
        return TrustError(
            f"the certificate presented at {self.url} is not from the controller CA in "
            f"{self._config.ca_path}; check that url and ca in the config belong to the same controller"
        )

    def _decode(self, status: int, raw: bytes) -> JsonObject:
        try:
            document = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            document = None
        if 200 <= status < 300:
            if not isinstance(document, dict):
                raise ApiError(f"the controller at {self.url} answered HTTP {status} with something that is not a JSON object", status=status)
            return document
        code = message = ""
        if isinstance(document, dict):
            code = str(document.get("error") or "")
            message = str(document.get("message") or "")
        if status == 401 and (code.startswith("session_") or code == "admin_credential_off" or not self._config.token):
            raise CredentialRefused(message or "the controller wants you to sign in: outpostctl login",
                                    code=code or "unauthorized", status=status)
        if status == 401:
            where = f" in {self._config.source}" if self._config.source else ""
            raise CredentialRefused(
                f"the controller refused the admin token{where} (HTTP 401); use the outpostctl.toml "
                "the controller wrote in its data directory",
                code=code or "unauthorized",
                status=status,
            )
        if not message:
            message = f"the controller at {self.url} answered HTTP {status} without an explanation; see its log"
        raise ApiError(message, code=code, status=status)


def _identity_path(name: str, action: str, tenant: str | None) -> str:
    # Quoted as one segment: a slash or dot-dot in a name cannot reach another endpoint.
    return f"/identities/{quote(name, safe='').replace('.', '%2E')}{action}{_tenant_query(tenant)}"


def _tenant_query(tenant: str | None) -> str:
    return "" if tenant is None else "?" + urlencode({"tenant": tenant})
