"""The one request pipeline every callback route runs.

Cheap and safe checks first (source address, body size), then the
provider's signature check, then parsing; only a verified delivery reaches
the store, and only the store runs receivers. Every outcome, including a bug,
is answered in the platform's own form: an HTML error page would read as
neither success nor a clean failure.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from .exc import (
    BadSignature,
    CallbackError,
    MalformedPayload,
    NoReceiver,
    PayloadTooLarge,
    ReceiverFailed,
    RequestRefused,
    SourceForbidden,
)
from .logtext import for_log, quoted
from .networks import address_allowed, forwarded_past_the_app
from .provider import Delivery, Provider
from .signals import callback_unhandled

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_orderhooks")


def make_blueprint(state: AppState) -> Blueprint:
    """A blueprint with one POST route per callback of every enabled platform."""
    blueprint = Blueprint("orderhooks", __name__)
    for provider in state.providers.values():
        for callback, rule in provider.routes.items():
            view = _view(state, provider, callback)
            blueprint.add_url_rule(rule, endpoint=view.__name__, view_func=view, methods=["POST"])
    return blueprint


def _view(state: AppState, provider: Provider, callback: str) -> Callable[[], Response]:
    def view() -> Response:
        return handle(state, provider, callback)

    view.__name__ = endpoint_name(provider.name, callback)
    return view


def endpoint_name(provider: str, callback: str) -> str:
    """The route's endpoint below the blueprint: ``<provider>_<callback>``
    with ``-`` and ``.`` spelled ``_`` (``url_for("orderhooks.<endpoint>")``;
    Flask refuses a dot in an endpoint)."""
    return f"{provider}_{callback}".replace("-", "_").replace(".", "_")


def handle(state: AppState, provider: Provider, callback: str) -> Response:
    """Run one callback request through the pipeline and answer it."""
    status, reason = _run(state, provider, callback)
    state.instruments.answered(provider.name, callback, status)
    return provider.answer(status, reason)


def _run(state: AppState, provider: Provider, callback: str) -> tuple[int, str]:
    """The pipeline: the HTTP status of the answer, and its reason."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    delivery: Delivery | None = None
    signature_matched = False
    try:
        _check_source(state, provider.name)
        body = _read_body(state.settings.max_body)
        headers = _signed_headers(provider)
        try:
            delivery = provider.read(callback, body, headers, now=state.clock())
        except CallbackError as exc:
            # read() verifies, then parses (Provider.read), and a request
            # that fails verification is a BadSignature: any other refusal
            # is of a request whose signature matched.
            signature_matched = not isinstance(exc, BadSignature)
            raise
        if state.settings.deferred and missing_receiver(app, delivery) is None:
            outcome = state.store.accept(delivery)
            if outcome == "accepted":
                state.enqueue(delivery.provider, delivery.callback, delivery.key, 0.0)
        else:
            # Inline, or deferred with a signal nobody listens to: then the
            # inline path keeps it as failed and answers 503, in both modes.
            received = delivery
            outcome = state.store.deliver(
                delivery,
                state.instruments.timed(provider.name, callback, lambda: send(app, received)),
            )
    except CallbackError as exc:
        key = _key(provider, delivery, signature_matched=signature_matched)
        _log_failure(provider, callback, key, exc)
        return exc.status, exc.reason
    except Exception:
        # A bug of ours must still read as "retry" to the platform.
        key = _key(provider, delivery, signature_matched=signature_matched)
        logger.exception("%s %s %s: unexpected error", provider.name, callback, key)
        return 500, "Internal error; retry later."
    logger.info("%s %s %s: %s", provider.name, callback, for_log(delivery.key), outcome)
    return 200, "OK"


def send(app: Flask, delivery: Delivery) -> None:
    """Send the delivery's signals in order, with the real app as sender.

    A delivery that only specific signals cover is refused (and kept as
    failed) when nothing is connected to them: acknowledging it would lose it.
    So is one a receiver answered with an awaitable (see
    :func:`_refuse_awaitables`).
    """
    missing = missing_receiver(app, delivery)
    if missing is not None:
        raise NoReceiver(f"No receiver is connected to {missing.name}; the delivery was kept.")
    for dispatch in delivery.dispatches:
        _refuse_awaitables(dispatch.signal, dispatch.signal.send(app, event=dispatch.event))


def _refuse_awaitables(signal: NamedSignal, results: Sequence[tuple[Any, Any]]) -> None:
    """Raise :class:`TypeError` when a receiver of ``signal`` returned an
    awaitable (each one is :func:`discarded <discard_awaitable>` first).

    blinker's ``send()`` refuses a coroutine *function*, but not an object
    whose ``__call__`` is ``async def``, nor a plain function that returns a
    coroutine: it calls them and hands back a coroutine nobody will await.
    That receiver's work never ran, so the delivery must fail (the store
    rolls back what the other receivers wrote and keeps it for the retry):
    counted as done, it would be lost. Not a :class:`CallbackError`: like
    any exception of a receiver, the store records it, naming the receiver
    for the operators, and the platform gets the usual public reason.
    """
    unawaited = [(receiver, result) for receiver, result in results if discard_awaitable(result)]
    if unawaited:
        receiver, result = unawaited[0]
        raise TypeError(
            f"The receiver {receiver!r} of {signal.name} returned an awaitable "
            f"({type(result).__name__}), which nothing awaits: signals call their receivers "
            "synchronously, so its work did not run. Make it a plain function, or run the "
            "coroutine to its end inside it (asyncio.run)."
        )


def discard_awaitable(result: object) -> bool:
    """Whether a receiver's ``result`` is an awaitable, which a synchronous
    sender can never run; a coroutine is closed on the way."""
    if not inspect.isawaitable(result):
        return False
    # Closed, a coroutine that never started runs none of its code and warns
    # of nothing ("never awaited", at garbage collection). Another awaitable
    # (a Future) holds nothing of ours to stop.
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()
    return True


def missing_receiver(app: Flask, delivery: Delivery) -> NamedSignal | None:
    """A signal ``delivery`` needs that has no receiver connected for ``app``."""
    for dispatch in delivery.dispatches:
        # Not has_receivers_for(): it answers "probably", and stays True after
        # the last receiver of a sender disconnects.
        if (
            dispatch.signal is not callback_unhandled
            and next(iter(dispatch.signal.receivers_for(app)), None) is None
        ):
            return dispatch.signal
    return None


def _check_source(state: AppState, platform: str) -> None:
    networks = state.settings.allowed_ips.get(platform)
    if not networks:
        return
    if not address_allowed(request.remote_addr, networks):
        raise SourceForbidden("The client address is not allowed.")
    unresolved = forwarded_past_the_app(request.environ, current_app.wsgi_app)
    if unresolved is not None and platform not in state.unresolved_proxy_warned:
        # The address allowed is the proxy's (loopback, for nginx on the same
        # machine): the list then lets every client of the proxy in. Not
        # refused, unlike the metrics: the signature still decides, and a
        # refusal of the platform's own callbacks would end in lost ones.
        # Once per process and platform, not a line per callback.
        state.unresolved_proxy_warned.add(platform)
        logger.warning(
            "%s: ORDERHOOKS_ALLOWED_IPS allowed %s, but the request came through a proxy "
            "(%s header) whose client the app does not resolve, so that is the proxy's "
            "address and the list lets every client of the proxy in (the signature is still "
            "checked). Wrap the app in werkzeug's ProxyFix with x_for= the number of "
            "proxies. (Said once per process.)",
            platform,
            request.remote_addr,
            unresolved.header,
        )


def _read_body(limit: int) -> bytes:
    """The body, refused past ``limit`` bytes without reading it whole."""
    # Werkzeug refuses a larger Content-Length unread. Without one (chunked),
    # its stream stops quietly at max_content_length: one byte more than
    # allowed tells "exactly the limit" from "longer" (a cut body could still
    # parse, and the rest of it would be lost).
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The body is larger than {limit} bytes.")
    request.max_content_length = limit + 1
    try:
        body = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"The body is larger than {limit} bytes.") from None
    except (ClientDisconnected, OSError):
        # The input ended before its Content-Length, or the connection broke
        # mid-body: the client's failure, not a bug of ours (500, ERROR).
        raise MalformedPayload(
            "The body ended before it was read whole (the client disconnected?)."
        ) from None
    except Exception as exc:
        if not _refused_framing(exc):
            raise
        raise MalformedPayload(
            f"The body's chunked transfer coding is malformed ({type(exc).__name__})."
        ) from None
    if len(body) > limit:
        raise PayloadTooLarge(f"The body is larger than {limit} bytes.")
    return body


def _refused_framing(exc: Exception) -> bool:
    """Whether ``exc`` is the server's HTTP parser refusing the framing of
    the body it was reading for us: gunicorn parses a chunked body as the
    app reads it, and raises its own errors (a bad chunk size, a missing
    chunk terminator, a bad extension or trailer), which are not
    ``OSError`` as Werkzeug's own server raises for the same input.

    Only gunicorn's request parse errors (``gunicorn.http.errors``), and
    only those it would answer with a 4xx itself: its ``code`` of 5xx marks
    its own configuration's. A bad input is a 400; anything else stays a
    500 (a retry), since a 400 to a server's failure would lose the
    callback. gunicorn is looked up, never imported: it is what raised, or
    it is not there.
    """
    errors = sys.modules.get("gunicorn.http.errors")
    parse_error = getattr(errors, "ParseException", None)
    if not (isinstance(parse_error, type) and isinstance(exc, parse_error)):
        return False
    code = getattr(exc, "code", 400)
    return not (isinstance(code, int) and code >= 500)


def _signed_headers(provider: Provider) -> dict[str, str]:
    # A repeated header reaches a WSGI app joined with ", " into one value,
    # which then fails the signature like any other wrong value.
    return {
        name: value
        for name in provider.signed_headers
        if (value := request.headers.get(name)) is not None
    }


def _key(provider: Provider, delivery: Delivery | None, *, signature_matched: bool) -> str:
    """The key as a log line holds it.

    A key is written raw only when it holds nothing that forges or hides
    log text (:func:`for_log`): a delivery exists before the store refuses
    its key for a control character, and a provider whose signature check
    is off lets anyone choose it. Before there is a delivery, the key is
    the provider's ``key_header`` as the request gave it: written like a
    delivery's once the signature over it matched (the body was refused
    after it), and otherwise marked unverified, quoted and cut short, so
    that whoever posts cannot forge log lines with it.
    """
    if delivery is not None:
        return for_log(delivery.key)
    claimed = request.headers.get(provider.key_header) if provider.key_header else None
    if not claimed:
        return "-"
    return for_log(claimed) if signature_matched else f"(unverified {quoted(claimed)})"


def _log_failure(provider: Provider, callback: str, key: str, exc: CallbackError) -> None:
    where = f"{provider.name} {callback} {key}"
    if isinstance(exc, ReceiverFailed):
        logger.error("%s: %s", where, exc.reason, exc_info=exc.__cause__ or exc)
    elif isinstance(exc, RequestRefused):
        logger.warning(
            "%s: refused %d from %s: %s", where, exc.status, request.remote_addr, exc.reason
        )
    else:
        logger.warning("%s: answered %d: %s", where, exc.status, exc.reason)
