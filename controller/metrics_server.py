"""``/metrics`` on a listener and a credential of its own (``--metrics-listen``; off by default).

Scrapers never get the admin credential: they present a bearer token kept in
``metrics.token`` in the data directory (0600, created on the first start
with metrics on, reused after), compared in constant time. The listener is
TLS with the controller's listener certificate (scrape with ``ca/ca.pem``)
and the same caps and deadlines as every other listener.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path

from aiohttp import web

from controller.blocking import API_POOL
from controller.errors import StartupError
from controller.metrics import ControllerMetrics
from shared.fsutil import atomic_write

log = logging.getLogger(__name__)

METRICS_TOKEN_FILE = "metrics.token"
#: Bytes of randomness in the token: as many as the admin token's.
METRICS_TOKEN_BYTES = 32
#: Characters of an Authorization header this listener reads at most: "Bearer " and a token.
MAX_AUTHORIZATION_CHARS = 256
# The text format Prometheus scrapes (0.0.4), which every prometheus-client release writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_token(data_dir: Path) -> str:
    """The scrape credential: read from ``metrics.token``, or created there (0600) on first use."""
    path = data_dir / METRICS_TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(METRICS_TOKEN_BYTES)
        atomic_write(path, (token + "\n").encode("ascii"))
        log.info("created the metrics credential %s (give it to the scraper, not the admin token)", path)
        return token
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError(f"Cannot read the metrics credential {path}: {error}; fix or remove the file.") from None
    if len(token) < 16:
        raise StartupError(f"The metrics credential {path} is shorter than 16 characters; remove it and a new "
                           "one is made at the next start.")
    return token


def metrics_app(metrics: ControllerMetrics, token: str) -> web.Application:
    """An application serving ``GET /metrics`` to the bearer of ``token``, and nothing else."""
    expected = f"Bearer {token}".encode()

    async def scrape(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")[:MAX_AUTHORIZATION_CHARS].encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "unauthorized", "message": "Send the metrics credential (metrics.token in the "
                 "controller's data directory) as a bearer token; the admin token is not accepted here."},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="outpost-metrics"'})
        snapshot = metrics.snapshot()
        body = await API_POOL.run(metrics.render, snapshot)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(client_max_size=1024)
    app.router.add_get("/metrics", scrape)
    return app
