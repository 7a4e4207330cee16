"""HTML of the dashboard's pages: string templates, every value through ``html.escape``.

Nothing here reads the store; the page modules hand in plain values. The
page links only the dashboard's own static files, and its Content-Security-Policy
(controller/dashboard/app.py) forbids everything else, inline scripts included.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

#: Seconds between the page's own reloads (static/dashboard.js): fresh enough for
#: presence, which changes at keepalive pace, and a bounded load of one page per
#: open tab every half minute.
REFRESH_SECONDS = 30
NAV = (("/ui/fleet", "Fleet"), ("/ui/connections", "Connections"), ("/ui/audit", "Audit"),
       ("/ui/policies", "Policies"))


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(stamp: object) -> str:
    """A Unix time as UTC to the second, or an empty cell."""
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        return ""
    try:
        return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def ago(stamp: object, now: float) -> str:
    """How long before ``now``: "12 s ago", "3 min ago", "5 h ago", "2 d ago"."""
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        return ""
    seconds = now - stamp
    if seconds < 0:
        return "in " + ago(now, stamp).removesuffix(" ago")
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def link(path: str, text: object, query: Mapping[str, str] | None = None, **attributes: str) -> str:
    href = path + ("?" + urlencode(query) if query else "")
    extra = "".join(f' {name.replace("_", "-")}="{esc(value)}"' for name, value in attributes.items())
    return f'<a href="{esc(href)}"{extra}>{esc(text)}</a>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, id_: str, raw_headers: bool = False) -> str:
    """A table whose cells are already HTML (each value escaped by whoever built it)."""
    head = "".join(f"<th>{h if raw_headers else esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{esc(id_)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def facts(pairs: Iterable[tuple[str, object]], *, id_: str) -> str:
    """A definition list of label → value (values escaped here)."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs)
    return f'<dl id="{esc(id_)}">{items}</dl>'


def page(title: str, body: str, *, who: str = "", csrf: str = "", refresh: bool = True, current: str = "") -> str:
    """A whole page: navigation, who is logged in with the logout form, and ``body`` (already HTML)."""
    nav = ""
    if who:
        items = "".join(f'<li{" class=current" if path == current else ""}>{link(path, text)}</li>'
                        for path, text in NAV)
        nav = (f'<nav><ul>{items}</ul><form method="post" action="/ui/logout" id="logout">'
               f'<span id="who">{esc(who)}</span><input type="hidden" name="csrf" value="{esc(csrf)}">'
               '<button type="submit">Log out</button></form></nav>')
    refresh_attr = f' data-refresh="{REFRESH_SECONDS}"' if refresh else ""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · Outpost</title>"
            '<link rel="stylesheet" href="/ui/static/dashboard.css">'
            '<script src="/ui/static/dashboard.js" defer></script>'
            f"</head><body{refresh_attr}><header><h1>Outpost</h1>{nav}</header>"
            f"<main><h2>{esc(title)}</h2>{body}</main></body></html>")


def refusal_page(message: str) -> str:
    """The one sentence a refused request gets, with the way back to the login."""
    return page("Refused", f'<p class="error" id="error">{esc(message)}</p><p>{link("/ui/login", "Log in")}</p>',
                refresh=False)


def login_page(form_token: str, error: str = "") -> str:
    problem = f'<p class="error" id="error">{esc(error)}</p>' if error else ""
    return page("Log in", problem + (
        '<form method="post" action="/ui/login" id="login" autocomplete="off">'
        f'<input type="hidden" name="csrf" value="{esc(form_token)}">'
        '<label>Admin credential, or the session token of <code>outpostctl login</code> '
        '<input type="password" name="token" id="token" required maxlength="4096"></label>'
        '<button type="submit" id="submit">Log in</button></form>'), refresh=False)


def options(name: str, choices: Sequence[str], selected: str, *, id_: str) -> str:
    opts = "".join(f'<option value="{esc(c)}"{" selected" if c == selected else ""}>{esc(c or "any")}</option>'
                   for c in ("", *choices))
    return f'<select name="{esc(name)}" id="{esc(id_)}">{opts}</select>'


def cell_json(value: Any) -> str:
    """A small mapping of event fields as ``key=value`` pairs, escaped."""
    if isinstance(value, Mapping):
        return esc(" ".join(f"{k}={v}" for k, v in value.items()))
    return esc(value)
