"""Replays: stale or future timestamps, and a used key sent again.

Time is the target's frozen clock (``OrderHooks(clock=...)``), never the
wall clock. The window is ``[now - MAX_AGE, now + MAX_CLOCK_SKEW]``, both
ends included, and it is checked only after the signature matched, so a
forger learns nothing about it.
"""

from __future__ import annotations

import itertools

import pytest

from flask_orderhooks.cli import orderhooks
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_changed,
)

from .conftest import FixedClock, Target, TargetFactory
from .support import (
    GATEWAY_KEYS,
    IGV_PATH,
    IGV_SECRET,
    MERCHANT_A,
    NOW,
    NOW_MS,
    SUD_APP_A,
    SUD_APPS,
    Answer,
    answer_of,
    igv_headers,
    ok,
    refused,
)

_ids = itertools.count()

HOUR_MS = 3_600_000
SKEW_MS = 300_000
OLDER = "The {} is older than 3600 seconds."
FUTURE = "The {} is more than 300 seconds in the future."

WINDOW = [
    pytest.param(0, None, id="now"),
    pytest.param(-HOUR_MS, None, id="exactly-max-age"),
    pytest.param(-HOUR_MS - 1, OLDER, id="1ms-too-old"),
    pytest.param(-86_400_000, OLDER, id="a-day-old"),
    pytest.param(SKEW_MS, None, id="exactly-max-skew"),
    pytest.param(SKEW_MS + 1, FUTURE, id="1ms-too-far-ahead"),
    pytest.param(86_400_000, FUTURE, id="a-day-ahead"),
    pytest.param(-NOW_MS, OLDER, id="zero"),
    pytest.param(NOW - NOW_MS, OLDER, id="seconds-not-ms"),
    pytest.param(10**18 - NOW_MS, FUTURE, id="year-31mil"),
]


@pytest.mark.parametrize(("offset", "reason"), WINDOW)
@pytest.mark.parametrize("platform", ["igv", "sud"])
def test_timestamp_window(target: Target, platform: str, offset: int, reason: str | None) -> None:
    stamp = NOW_MS + offset
    key = f"win-{platform}-{next(_ids)}"
    if platform == "igv":
        cb = igv_order_status(IGV_SECRET, request_id=key, timestamp_ms=stamp)
        header = "X-Timestamp"
    else:
        cb = sud_order_changed(
            SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=key, timestamp_ms=stamp
        )
        header = "Sud-Timestamp"
    if reason is None:
        target.accept_cb(cb)
    else:
        target.refuse_cb(cb, refused(platform, 401, reason.format(header)))


def test_signature_is_checked_before_the_window(target: Target) -> None:
    # A forged, stale request says "does not match", never "too old".
    cb = igv_order_status(IGV_SECRET, request_id="stale-forged", timestamp_ms=NOW_MS - 2 * HOUR_MS)
    headers = {**cb.headers, "X-Signature": "0" * 64}
    target.refuse(
        IGV_PATH, cb.body, headers, refused("igv", 401, "The X-Signature does not match.")
    )


NOT_13_DIGITS = (
    "The X-Timestamp header is not 13 digits of Unix milliseconds, so the signature does "
    "not bind the request id."
)


@pytest.mark.parametrize(
    ("timestamp", "request_id", "reason"),
    [
        pytest.param(
            "173485009900", "02002986662652579841", NOT_13_DIGITS, id="a-digit-to-the-request-id"
        ),
        # Ten times the clock: the skew, which stays without a max age.
        pytest.param(
            "17348500990002",
            "002986662652579841",
            FUTURE.format("X-Timestamp"),
            id="a-digit-to-the-timestamp",
        ),
    ],
)
def test_igv_digits_cannot_move_between_the_timestamp_and_the_request_id(
    make_target: TargetFactory, timestamp: str, request_id: str, reason: str
) -> None:
    """iGV signs ``X-Timestamp + X-Request-Id + secret`` with no separator,
    so a digit moved across the boundary signs the same bytes: the vector's
    pair ("1734850099000", "2002986662652579841") and ("173485009900",
    "02002986662652579841") share a signature. The second is a new request
    id, so a new delivery with any body (iGV signs none). A window refuses
    it as ten times too old or too new; with ``ORDERHOOKS_IGV_MAX_AGE =
    None`` only the timestamp's fixed length does (before: 200, dispatched)."""
    vector = igv_order_status(
        IGV_SECRET, request_id="2002986662652579841", timestamp_ms=1734850099000
    )
    assert timestamp + request_id == "1734850099000" + "2002986662652579841"
    unwindowed = make_target(ORDERHOOKS_IGV_MAX_AGE=None)
    unwindowed.accept_cb(vector)
    moved = {**vector.headers, "X-Timestamp": timestamp, "X-Request-Id": request_id}
    unwindowed.refuse(IGV_PATH, vector.body, moved, refused("igv", 401, reason))


@pytest.mark.parametrize(
    ("config", "offset", "reason"),
    [
        ({"ORDERHOOKS_IGV_MAX_AGE": 60}, -60_001, "The X-Timestamp is older than 60 seconds."),
        ({"ORDERHOOKS_IGV_MAX_AGE": 60}, -60_000, None),
        (
            {"ORDERHOOKS_MAX_CLOCK_SKEW": 0},
            1,
            "The X-Timestamp is more than 0 seconds in the future.",
        ),
        ({"ORDERHOOKS_MAX_CLOCK_SKEW": 0}, 0, None),
    ],
)
def test_configured_windows_apply(
    make_target: TargetFactory, config: dict[str, int], offset: int, reason: str | None
) -> None:
    tight = make_target(**config)
    cb = igv_order_status(
        IGV_SECRET, request_id=f"tight-{next(_ids)}", timestamp_ms=NOW_MS + offset
    )
    if reason is None:
        tight.accept_cb(cb)
    else:
        tight.refuse_cb(cb, refused("igv", 401, reason))


def test_sud_seconds_unit_when_configured(make_target: TargetFactory) -> None:
    seconds = make_target(ORDERHOOKS_SUD_TIMESTAMP_UNIT="s")
    # The platform sends seconds; milliseconds are then 1000 times too far ahead.
    seconds.accept_cb(_sud_cb("unit-s", str(NOW_MS), unit="s"))
    reason = "The Sud-Timestamp is more than 300 seconds in the future."
    seconds.refuse_cb(_sud_cb("unit-ms", str(NOW_MS), unit="ms"), refused("sud", 401, reason))


def _sud_cb(notify: str, stamp: str, unit: str = "ms") -> SignedCallback:
    return sud_order_changed(
        SUD_APPS[SUD_APP_A],
        app_id=SUD_APP_A,
        notify_id=notify,
        timestamp_ms=stamp,
        timestamp_unit=unit,
    )


# -- a used key, sent again -------------------------------------------------------


def _igv_body(order_id: int) -> bytes:
    return igv_order_status(IGV_SECRET, request_id="x", timestamp_ms=NOW_MS, order_id=order_id).body


def test_done_request_id_with_another_body_is_acknowledged_without_dispatch(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    headers = igv_headers("reuse-done")
    [first] = target.accept(IGV_PATH, _igv_body(1), headers, "reuse-done")
    assert first.event.order_id == 1
    before = target.snapshot()
    # The captured headers, replayed with a body naming another order.
    response = target.post(IGV_PATH, _igv_body(2), headers)
    assert answer_of("igv", response) == ok("igv")
    assert target.recorder.events == []
    assert target.snapshot() == before
    row = target.row("igv", "order-status", "reuse-done")
    assert row is not None
    assert (row.status, row.attempts, row.body) == ("done", 1, _igv_body(1))
    assert (
        "flask_orderhooks",
        30,
        "igv order-status reuse-done: already done; a resend with a different body was ignored",
    ) in caplog.record_tuples


def test_failed_request_id_with_another_body_conflicts(target: Target) -> None:
    headers = igv_headers("reuse-failed")
    target.recorder.fail_with = RuntimeError("the receiver broke")
    try:
        response = target.post(IGV_PATH, _igv_body(1), headers)
    finally:
        target.recorder.fail_with = None
    assert answer_of("igv", response) == refused(
        "igv", 500, "A receiver failed; the delivery will be retried."
    )
    target.verified.add(("igv", "order-status", "reuse-failed"))
    target.unfinished.add(("igv", "order-status", "reuse-failed"))
    conflict = refused("igv", 409, "This key is stored with a different body.")
    target.refuse(IGV_PATH, _igv_body(2), headers, conflict)
    # The platform's own retry, with the original body, still goes through.
    [retry] = target.accept(IGV_PATH, _igv_body(1), headers, "reuse-failed")
    assert retry.event.order_id == 1
    target.unfinished.discard(("igv", "order-status", "reuse-failed"))


def test_processing_request_id_with_another_body_conflicts(make_target: TargetFactory) -> None:
    # No wait for the duplicate of a delivery in flight: answered at once.
    quick = make_target(ORDERHOOKS_DUPLICATE_WAIT=0)
    headers = igv_headers("reuse-processing")
    with quick.app.app_context():
        state = quick.hooks.state(quick.app)
        delivery = state.providers["igv"].read("order-status", _igv_body(1), headers, now=NOW)
        assert state.store.claim(delivery) is not None
    quick.verified.add(("igv", "order-status", "reuse-processing"))
    quick.unfinished.add(("igv", "order-status", "reuse-processing"))
    conflict = refused("igv", 409, "This key is stored with a different body.")
    quick.refuse(IGV_PATH, _igv_body(2), headers, conflict)
    busy = refused("igv", 503, "Another worker is handling this delivery; retry later.")
    quick.refuse(IGV_PATH, _igv_body(1), headers, busy)


@pytest.mark.parametrize("kind", ["igv", "sud", "collect", "payout"])
def test_exact_replay_is_acknowledged_without_dispatch(target: Target, kind: str) -> None:
    key = f"replay-{kind}-{next(_ids)}"
    if kind == "igv":
        cb = igv_order_status(IGV_SECRET, request_id=key, timestamp_ms=NOW_MS)
    elif kind == "sud":
        cb = sud_order_changed(
            SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=key, timestamp_ms=NOW_MS
        )
    elif kind == "collect":
        cb = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id=key)
    else:
        cb = gateway_payout(GATEWAY_KEYS[str(MERCHANT_A)], id=key)
    assert len(target.accept_cb(cb)) == 1
    before = target.snapshot()
    for _ in range(3):
        response = target.post(cb.url(), cb.body, cb.headers)
        assert answer_of(cb.provider, response) == ok(cb.provider)
        assert target.recorder.events == []
    assert target.snapshot() == before


def test_captured_request_is_refused_once_its_window_closes(
    target: Target, clock: FixedClock
) -> None:
    # Inside the window the store answers a replay; after it, the timestamp does.
    cb = igv_order_status(IGV_SECRET, request_id="captured", timestamp_ms=NOW_MS)
    target.accept_cb(cb)
    clock.now = NOW + 3600.001
    expired: Answer = refused("igv", 401, "The X-Timestamp is older than 3600 seconds.")
    target.refuse_cb(cb, expired)


def test_gateway_new_status_of_the_same_order_is_a_new_delivery(target: Target) -> None:
    # The key is id:status; a captured "processing" callback cannot become a success.
    key = GATEWAY_KEYS[str(MERCHANT_A)]
    processing = gateway_collect(key, id="ORD-STATUS", status=20, payed_at=None)
    success = gateway_collect(key, id="ORD-STATUS", status=60)
    assert [c.event.status for c in target.accept_cb(processing)] == [20]
    assert [c.event.status for c in target.accept_cb(success)] == [60]
    forged = processing.body.replace(b'"status":20', b'"status":60')
    target.refuse(processing.url(), forged, processing.headers, (401, "fail"))


# -- purge and the window -----------------------------------------------------------


@pytest.mark.parametrize("platform", ["igv", "sud"])
def test_purge_keeps_a_request_stamped_ahead_refused_until_its_stamp_expires(
    make_target: TargetFactory, platform: str
) -> None:
    """Stamped MAX_CLOCK_SKEW ahead, a request is accepted until MAX_AGE after
    its stamp: 3,900 s after it arrived, not 3,600. Deleted after 3,601 s, its
    delivery would come in again from a captured copy (on iGV with any body:
    the body is unsigned). Purge compacts it instead, and deletes it only
    once the stamp has expired, when the timestamp itself refuses the copy."""
    target = make_target()
    key = f"ahead-{platform}"
    if platform == "igv":
        cb = igv_order_status(IGV_SECRET, request_id=key, timestamp_ms=NOW_MS + SKEW_MS)
        forged = cb.body.replace(b'"orderId":', b'"orderId":9')
        header = "X-Timestamp"
    else:
        cb = _sud_cb(key, str(NOW_MS + SKEW_MS))
        forged = cb.body
        header = "Sud-Timestamp"
    assert len(target.accept_cb(cb)) == 1

    def purge(older_than: str) -> str:
        result = target.app.test_cli_runner().invoke(
            orderhooks, ["purge", "--older-than", older_than]
        )
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[0]

    target.clock.now = NOW + 3700
    assert purge("3601s") == "Deleted 0 and compacted 1 deliveries older than 3601s (done)."
    for body in {cb.body, forged}:
        response = target.post(cb.url(), body, cb.headers)
        assert answer_of(platform, response) == ok(platform)
        assert target.recorder.events == [], "a replay inside the window was dispatched again"

    target.clock.now = NOW + 3960
    assert purge("3901s") == "Deleted 1 and compacted 0 deliveries older than 3901s (done)."
    target.verified.discard((platform, cb.url().rsplit("/", 1)[1], key))
    target.refuse_cb(cb, refused(platform, 401, OLDER.format(header)))
