"""The review page's routes: server-rendered HTML (Jinja2, every value escaped) with a little plain
JavaScript, and the JSON API behind it.

Security: every request needs the access token — from the cookie that visiting `/?token=…` sets
(HttpOnly, SameSite=Strict), or `Authorization: Bearer …` — else 401. State-changing requests (POST)
need the token in a header, which another site's page cannot add, else 403; `--read-only` refuses them
all. Images are addressed by journal id only: no request parameter ever becomes a filesystem path.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from flask import Flask, Response, abort, current_app, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from autocaption.catalog import STATUSES, Catalog, Image, wheres
from autocaption.config import Config
from autocaption.errors import ConfigError, WriteError
from autocaption.journal import JournalDamaged, JournalFull
from autocaption.paths import display
from autocaption.review import PREVIEW, THUMBNAIL, Conflict, Detail, NotFound, Review, keywords_from
from autocaption.textclean import carriable

COOKIE = "autocaption_token"
HEADER = "X-Autocaption-Token"
PER_PAGE = 60
POLICY = (
    "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class Site:
    """What every request of one page shares: the config, the photos' review, their catalog, the token."""

    config: Config
    review: Review
    catalog: Catalog
    token: str
    read_only: bool


def create_app(config: Config, review: Review, token: str, *, read_only: bool = False) -> Flask:
    app = Flask(__name__)
    app.config.update(TOKEN=token, READ_ONLY=read_only, MAX_CONTENT_LENGTH=64 * 1024)
    app.jinja_env.filters["shown"] = display  # names that are not UTF-8, or hold a newline, as printable text
    app.extensions["autocaption"] = Site(config, review, Catalog(review.journal), token, read_only)
    app.before_request(authenticate)
    app.after_request(harden)
    for error, handler in ERRORS:
        app.register_error_handler(error, handler)
    for rule, view, methods in (*PAGES, *MEDIA, *API):
        app.add_url_rule(rule, view_func=view, methods=methods)
    return app


def _site() -> Site:
    site: Site = current_app.extensions["autocaption"]
    return site


# --- every request: the token, the headers, errors as pages or JSON -------------------------------------------


def authenticate() -> Any:
    site = _site()
    header = _bearer() or request.headers.get(HEADER, "")
    given = header or request.cookies.get(COOKIE, "") or request.args.get("token", "")
    if not _same(given, site.token):
        return _error(401, "this page needs its access token: open the URL `autocaption web` printed")
    if request.method == "GET" and "token" in request.args:  # set the cookie, drop the token from the URL
        arguments: dict[str, Any] = {k: v for k, v in request.args.items() if k != "token"}
        response = redirect(url_for(request.endpoint or "grid", **(request.view_args or {}), **arguments))
        response.set_cookie(COOKIE, site.token, httponly=True, samesite="Strict", secure=request.is_secure)
        return response
    if request.method not in ("GET", "HEAD"):
        if not _same(header, site.token):
            return _error(403, f"state-changing requests need the token in a header ({HEADER})")
        if site.read_only:
            return _error(403, "read-only: this page was started with --read-only")
    return None


def harden(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "private, no-store" if response.mimetype != "image/jpeg" else "private"
    return response


def _status_of(exc: Exception) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, WriteError):
        return 503 if exc.transient else 500
    return 503  # the journal is damaged, or its disk is full


def domain_error(exc: Exception) -> Response:
    return _error(_status_of(exc), str(exc))


def http_error(exc: HTTPException) -> Response:
    return _error(exc.code or 500, exc.description or exc.name)


ERRORS: tuple[tuple[type[Exception], Callable[[Any], Response]], ...] = (
    (NotFound, domain_error), (Conflict, domain_error), (JournalDamaged, domain_error), (JournalFull, domain_error),
    (WriteError, domain_error), (HTTPException, http_error),
)  # fmt: skip


# --- pages ---------------------------------------------------------------------------------------------------


def grid() -> str:
    site = _site()
    filters = _filters()
    after = request.args.get("after", "")
    page = site.catalog.page(**filters, page=_page(), per_page=PER_PAGE, after=after)
    pages = max(1, math.ceil(page.total / PER_PAGE)) + (1 if page.capped else 0)  # "of 167+"
    args = {"q": filters["query"], "status": filters["status"], "rule": filters["rule"], "folder": filters["folder"],
            **dict(filters["values"])}  # what the page links keep  # fmt: skip
    return render_template(
        "grid.html", page=page, filters=filters, number=_page(), pages=pages, statuses=list(STATUSES),
        rules=[rule.name for rule in site.config.rules], folders=[str(w.path) for w in site.config.watch],
        token=site.token, read_only=site.read_only, caption=_caption, when=_when, after=after, args=args,
        badges=_badges(site.config),
    )  # fmt: skip


def detail(image_id: int) -> str:
    site = _site()
    found = site.review.detail(image_id)
    kinds = {rule.name: rule.structure.kind for rule in site.config.rules if rule.structure is not None}
    return render_template("detail.html", detail=found, token=site.token, read_only=site.read_only, when=_when,
                           current=_current(found), kinds=kinds)  # fmt: skip


PAGES = (("/", grid, ["GET"]), ("/images/<int:image_id>", detail, ["GET"]))


# --- media: the photos, made small ---------------------------------------------------------------------------


def thumbnail(image_id: int) -> Response:
    return Response(_site().review.preview(image_id, THUMBNAIL), mimetype="image/jpeg")


def preview(image_id: int) -> Response:
    return Response(_site().review.preview(image_id, PREVIEW), mimetype="image/jpeg")


MEDIA = (("/thumbnails/<int:image_id>.jpg", thumbnail, ["GET"]), ("/previews/<int:image_id>.jpg", preview, ["GET"]))


# --- the JSON API ----------------------------------------------------------------------------------------------


def api_images() -> Response:
    per_page = min(max(_integer("per_page", 100), 1), 500)
    # `after`: the `next` of the page before, read from the index however deep (no OFFSET)
    page = _site().catalog.page(**_filters(), page=_page(), per_page=per_page, after=request.args.get("after", ""))
    return jsonify(total=page.total, total_capped=page.capped, page=_page(), per_page=per_page, next=page.next,
                   images=[_summary(i) for i in page.images])  # fmt: skip


def api_image(image_id: int) -> Response:
    return jsonify(_full(_site().review.detail(image_id)))


def api_caption(image_id: int) -> Response:
    body = request.get_json(silent=True)
    shape = 'send JSON: {"sha256": "<the photo\'s, as shown>", "description": "...", "keywords": ["...", ...]}'
    if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
        return _error(400, shape)
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        return _error(400, shape)
    if description is not None:
        description = carriable(description)  # what metadata cannot carry never reaches the writers
    if description is not None and not description:
        return _error(400, "description must not be empty")
    alt_text = body.get("alt_text")
    if alt_text is not None and not isinstance(alt_text, str):
        return _error(400, shape)
    alt_text = carriable(alt_text) if alt_text is not None else None
    if alt_text is not None and not alt_text:
        return _error(400, "alt_text must not be empty")
    if description is None and "keywords" not in body and alt_text is None:
        return _error(400, "nothing to change: send a description, keywords, an alt_text or several")
    try:
        keywords = keywords_from(body["keywords"]) if "keywords" in body else None
    except ValueError as exc:
        return _error(400, str(exc))
    return jsonify(_full(_site().review.correct(image_id, description, keywords, body["sha256"], alt_text)))


def api_describe(image_id: int) -> Response:
    review = _site().review
    running = review.describe_again(image_id)
    path = review.image(image_id).path
    message = (
        "queued: the daemon describes it again shortly" if running
        else f"queued, but no daemon is running: run `autocaption process --force {path}`"
    )  # fmt: skip
    return jsonify(queued=True, daemon=running, message=message)


API = (
    ("/api/images", api_images, ["GET"]),
    ("/api/images/<int:image_id>", api_image, ["GET"]),
    ("/api/images/<int:image_id>/caption", api_caption, ["POST"]),
    ("/api/images/<int:image_id>/describe", api_describe, ["POST"]),
)


def _bearer() -> str:
    value = request.headers.get("Authorization", "")
    return value[7:].strip() if value.startswith("Bearer ") else ""


def _same(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _error(status: int, message: str) -> Response:
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        response = jsonify(error=message)
    else:
        response = Response(render_template("error.html", status=status, message=message), mimetype="text/html")
    response.status_code = status
    return response


def _integer(name: str, default: int) -> int:
    """A whole number of at most nine digits (ASCII only: "²" is a digit to Python, not to SQLite)."""
    value = request.args.get(name, str(default))
    if not re.fullmatch(r"-?[0-9]{1,9}", value):
        abort(400, f"{name} must be a whole number below 1000000000")
    return int(value)


def _page() -> int:
    return max(_integer("page", 1), 1)


def _filters() -> dict[str, Any]:
    status = request.args.get("status", "")
    if status and status not in STATUSES:
        abort(400, f"status must be one of {', '.join(STATUSES)}")
    named = {name: request.args.get(key, "") for name, key in (("query", "q"), ("rule", "rule"), ("folder", "folder"))}
    return named | {"status": status, "values": _values()}


def _values() -> tuple[tuple[str, str], ...]:
    """`?blurry=yes&keywords=beach`: a choice or list rule's name as a parameter filters by its answer."""
    config = _site().config
    valued = [rule for rule in config.rules if rule.structure is not None and rule.structure.kind != "json"]
    named = [f"{rule.name}={request.args[rule.name]}" for rule in valued if request.args.get(rule.name)]
    try:
        return wheres(config, named)
    except ConfigError as exc:
        abort(400, str(exc).removeprefix("--where "))


def _summary(image: Image) -> dict[str, Any]:
    return {"id": image.id, "path": display(image.path), "status": image.status, "error": image.error,
            "updated": _iso(image.updated), "answers": image.answers, "caption": image.caption,
            "thumbnail": f"/thumbnails/{image.id}.jpg"}  # fmt: skip


def _full(detail: Detail) -> dict[str, Any]:
    document = detail.document or {}
    return {
        **_summary(detail.image),
        "preview": f"/previews/{detail.image.id}.jpg",
        "sidecar": detail.sidecar.name if detail.document else None,
        "model": document.get("model"),
        "rules": document.get("rules", {}),
        "written": document.get("written"),
        "edited": document.get("edited"),
        "caption": _current(detail),
    }


def _current(detail: Detail) -> dict[str, Any]:
    """The caption the photo carries now, read from it (a person's correction, the model's or another tool's
    text) — what the form shows and a save starts from, so that saving changes only what the person changed."""
    edited = (detail.document or {}).get("edited")
    return {
        "description": detail.description or detail.image.caption,
        "keywords": list(detail.keywords),
        "title": detail.texts.get("title"),
        "alt_text": detail.texts.get("alt_text"),
        "by": "person" if isinstance(edited, dict) else "model",
        "sha256": detail.sha256,
    }


def _badges(config: Config) -> list[str]:
    """The choice rules, whose answers a card shows as badges (blurry: no)."""
    return [rule.name for rule in config.rules if rule.structure is not None and rule.structure.kind == "choice"]


def _caption(image: Image) -> str:
    """What a card shows: what the photo says now (a person's correction first, else the first answer)."""
    return image.caption


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")
