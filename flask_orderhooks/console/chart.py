"""The list page's chart: deliveries per hour over the last 24 hours, stacked
by status, as plain geometry that the template writes out as inline SVG.

No script and no ``style`` attribute (the console's CSP allows neither):
colours come from the stylesheet, through one class per status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..store import DEAD, DONE, FAILED, PENDING, PROCESSING

#: Bottom to top of each bar.
ORDER = (DONE, PROCESSING, PENDING, FAILED, DEAD)

WIDTH = 720
HEIGHT = 220
_LEFT = 44
_RIGHT = 8
_TOP = 12
_BOTTOM = 28
_GAP = 4


@dataclass(frozen=True)
class Segment:
    """One status's part of one hour's bar."""

    status: str
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Bar:
    """One hour."""

    start: datetime
    total: int
    x: float
    width: float
    segments: tuple[Segment, ...]
    #: The hour's label under the axis, every third hour; else ``None``.
    label: str | None

    @property
    def title(self) -> str:
        """What a pointer over the bar shows (the SVG ``<title>``)."""
        parts = [f"{s.count} {s.status}" for s in self.segments]
        hour = self.start.strftime("%Y-%m-%d %H:00Z")
        return f"{hour}: {self.total} deliveries" + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class Tick:
    """A horizontal grid line with its count."""

    y: float
    value: int


@dataclass(frozen=True)
class Chart:
    """Everything the template draws."""

    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    totals: Mapping[str, int]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    baseline: int = HEIGHT - _BOTTOM

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def _nice_top(peak: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``peak``."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if top * step >= peak:
                return top * step
        top *= 10


def build(counts: Mapping[datetime, Mapping[str, int]], start: datetime, hours: int = 24) -> Chart:
    """Lay out ``counts`` (``{hour start: {status: count}}``) for the
    ``hours`` hours from ``start``."""
    inner_width = WIDTH - _LEFT - _RIGHT
    inner_height = HEIGHT - _TOP - _BOTTOM
    slot = inner_width / hours
    peak = max((sum(by_status.values()) for by_status in counts.values()), default=0)
    top = _nice_top(max(peak, 1))
    scale = inner_height / top
    baseline = HEIGHT - _BOTTOM
    totals = dict.fromkeys(ORDER, 0)
    bars: list[Bar] = []
    for n in range(hours):
        hour = start + timedelta(hours=n)
        by_status = counts.get(hour, {})
        x = _LEFT + n * slot + _GAP / 2
        width = slot - _GAP
        y = float(baseline)
        segments: list[Segment] = []
        # Statuses a newer version might add are drawn last, on top.
        for status in (*ORDER, *sorted(set(by_status) - set(ORDER))):
            count = by_status.get(status, 0)
            if count <= 0:
                continue
            totals[status] = totals.get(status, 0) + count
            height = count * scale
            y -= height
            segments.append(Segment(status, count, x, y, width, height))
        bars.append(
            Bar(
                start=hour,
                total=sum(s.count for s in segments),
                x=x,
                width=width,
                segments=tuple(segments),
                label=hour.strftime("%H:00") if n % 3 == 0 else None,
            )
        )
    ticks = tuple(Tick(baseline - value * scale, value) for value in (0, top // 2, top) if value)
    return Chart(bars=tuple(bars), ticks=(Tick(float(baseline), 0), *ticks), totals=totals)
