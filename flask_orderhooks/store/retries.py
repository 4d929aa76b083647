"""The local retry schedule: when a failed attempt is tried again, and when to give up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .table import DEAD, FAILED


@dataclass(frozen=True)
class RetrySchedule:
    """``ORDERHOOKS_RETRY_DELAYS``: the seconds before each next attempt.

    Attempts in all are ``len(delays) + 1``; after the last one the delivery
    is dead.
    """

    delays: tuple[float, ...]

    @classmethod
    def of(cls, delays: Sequence[float]) -> RetrySchedule:
        return cls(tuple(float(d) for d in delays))

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def after_failure(self, attempt: int, now: datetime) -> tuple[str, datetime | None]:
        """The status and next due time after attempt number ``attempt`` failed."""
        if attempt >= self.max_attempts:
            return DEAD, None
        return FAILED, now + timedelta(seconds=self.delays[max(attempt, 1) - 1])


#: One attempt, no local retries.
NO_RETRIES = RetrySchedule(())
