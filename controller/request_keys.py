"""Keys for what the management API's door leaves on a request: who asked, their grants, the tenants they reach.

aiohttp 3.13 and later warn (``NotAppKeyWarning``) on a plain ``str`` key and
offer ``web.RequestKey``; Debian 12's aiohttp 3.8 has no such class and takes a
``str`` without a word. This is the one place that tells them apart.
"""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web


def request_key(name: str) -> web.RequestKey[Any]:
    """A request key named ``name``: ``web.RequestKey`` where aiohttp has it, the ``str`` itself where it has not.

    Annotate the constant it makes (``KEY: web.RequestKey[Actor] = request_key("actor")``) so reads are typed.
    """
    key_class = getattr(web, "RequestKey", None)
    return cast("web.RequestKey[Any]", name if key_class is None else key_class(name))
