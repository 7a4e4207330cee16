"""The controller's aiohttp applications: the middlewares every request passes, and the route table by role.

Every refusal leaves as JSON; a body is read whole within its deadline and
size before a handler sees it; an enrollment refused unread is still audited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from controller.api import MAX_REQUEST_BODY, REFUSAL_EVENTS, GatewayApi, ManagementApi, too_large
from controller.audit_api import AuditApi
from controller.blocking import API_POOL
from controller.context import ControllerContext
from controller.dashboard.app import Dashboard
from controller.errors import BodyRefused, ControllerError
from controller.fleet_api import FleetApi
from controller.grants_api import GrantsApi
from controller.listener import REQUEST_BODY_DEADLINE, guarded_connection
from controller.policy_admin import PolicyAdminApi
from controller.policy_api import PolicyExplainApi
from controller.relay.relay import Relay
from controller.relays_api import RelaysApi
from controller.signin.api import SigninApi, management_auth
from controller.signin.service import SigninService

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIX = "/api/"

_HTTP_ERROR_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def error_response(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal leaves as ``{"error": code, "message": sentence}``; no tracebacks leave."""
    try:
        return await handler(request)
    except ControllerError as error:
        return error_response(error.code, error.message, error.status)
    except web.HTTPException as exception:
        if exception.status < 400:
            raise
        if exception.status == 413:
            refusal = too_large()
            return error_response(refusal.code, refusal.message, refusal.status)
        code = _HTTP_ERROR_CODES.get(exception.status, "http_error")
        message = {
            404: f"There is nothing at {request.path}; check the URL.",
            405: f"{request.method} is not supported on {request.path}.",
        }.get(exception.status, exception.reason or "The request was refused.")
        return error_response(code, message, exception.status)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response("internal", "The controller failed on this request; see its log.", 500)


@web.middleware
async def request_deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The request head is complete: stop its deadline, and read any body within the body deadline.

    The body is read here, whole and bounded by MAX_REQUEST_BODY, so that the
    handlers' own read gets it at once; a body that trickles is cut off, and
    a client that goes away during it costs one log line.
    """
    connection = guarded_connection(request)
    if connection is not None:
        connection.request_started()
    try:
        if request.body_exists:
            deadline = connection.listener.limits.body_deadline if connection is not None else REQUEST_BODY_DEADLINE
            try:
                await asyncio.wait_for(request.read(), deadline)
            except TimeoutError:
                log.info("%s did not send the body of %s %s within %g s; connection closed",
                         request.remote, request.method, request.path, deadline)
                if connection is not None:
                    connection.abort()
                raise BodyRefused("body_timeout", f"The request body did not arrive within {deadline:g} s; "
                                  "send it at once or check the link.", 408) from None
            except web.HTTPRequestEntityTooLarge:
                raise too_large() from None
            except (ConnectionError, aiohttp.ClientConnectionError, aiohttp.http_exceptions.HttpProcessingError,
                    asyncio.IncompleteReadError) as error:
                log.info("%s went away during the body of %s %s (%s)", request.remote, request.method,
                         request.path, error.__class__.__name__)
                if connection is not None:
                    connection.abort()
                raise BodyRefused("body_incomplete", "The request body was cut off; send it again.", 400) from None
        return await handler(request)
    finally:
        if connection is not None:
            connection.request_finished()


@web.middleware
async def refuse_large_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a declared oversized body from its header, before a byte of it is read."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        raise too_large()
    return await handler(request)


def audit_unread_refusals(context: ControllerContext) -> Any:
    """Audit an enrollment or renewal refused before its content was read (413, not a JSON object).

    Nobody proved to be anybody yet, so the event names the peer's address
    and the reason only, and goes through the audit log's anonymous budget,
    like the refusals judged on the content (controller/enrollment.py,
    controller/renewal.py).
    """

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BodyRefused as error:
            event = REFUSAL_EVENTS.get(request.path) if request.method == "POST" else None
            if event is not None:
                # An fsynced row: in a worker thread, like every other store write (controller/blocking.py).
                try:
                    await API_POOL.run(context.audit.record_anonymous, event, reason=error.code, remote=request.remote)
                except ControllerError:
                    log.warning("audit: %s not recorded (the controller is busy)", event)
            raise

    return audit


def build_app(context: ControllerContext, relay: Relay, *, gateway: bool = True, api: bool = True) -> web.Application:
    """An aiohttp application: the gateway routes and the relay, the management API, or both.

    ``--role controller`` serves no tunnels; ``--role relay`` serves tunnels alone (it holds no CA key).
    """
    settings = context.settings
    api = api and settings.serves_controller
    middlewares = [errors_as_json]
    if api:
        if context.signin is None:
            context.signin = SigninService(context.settings.signin, context.store, context.registry, context.audit)
        middlewares.append(management_auth(context))
    middlewares += [audit_unread_refusals(context), refuse_large_bodies, request_deadlines]
    app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=middlewares)
    if gateway and settings.serves_controller:
        GatewayApi(context).add_routes(app)
        RelaysApi(context).add_gateway_routes(app)
    if gateway and settings.serves_tunnels:
        app.router.add_get("/v1/tunnel", relay.handle)
    if api:
        RelaysApi(context).add_management_routes(app)
        ManagementApi(context, relay.status).add_routes(app)
        FleetApi(context, relay.presence).add_routes(app)
        PolicyExplainApi(context).add_routes(app)
        PolicyAdminApi(context).add_routes(app)
        GrantsApi(context).add_routes(app)
        SigninApi(context).add_routes(app)
        AuditApi(context).add_routes(app)
        Dashboard(context, relay).add_routes(app)
    elif gateway and settings.serves_controller:
        async def api_elsewhere(request: web.Request) -> web.Response:
            return error_response(
                "not_found", "The management API is not served here but on its own listener (--api-listen); "
                "see outpostctl.toml for its URL.", 404)

        app.router.add_route("*", API_PREFIX + "{tail:.*}", api_elsewhere)
    return app
