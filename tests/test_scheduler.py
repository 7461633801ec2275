"""The nightly schedule: crontab semantics, catch-up of missed runs, a real BackgroundScheduler."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from daemon.scheduler import (
    NightlyScheduler,
    ScheduleError,
    format_last_run,
    missed_run,
    parse_last_run,
    parse_schedule,
)

TZ = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2024, 6, 3, 12, 0, tzinfo=TZ)  # 2024-06-03 was a Monday


def fires(expr: str, start: datetime = MONDAY, count: int = 3) -> list[datetime]:
    trigger = parse_schedule(expr, TZ)
    out, previous = [], None
    now = start
    for _ in range(count):
        nxt = trigger.get_next_fire_time(previous, now)
        out.append(nxt)
        previous, now = nxt, nxt + timedelta(seconds=1)
    return out


def test_default_schedule_is_daily_at_three():
    assert fires("0 3 * * *") == [datetime(2024, 6, d, 3, 0, tzinfo=TZ) for d in (4, 5, 6)]


def test_weekday_numbers_follow_crontab_not_apscheduler():
    # crontab: 0 and 7 are Sunday, 1 is Monday (APScheduler 3 alone would read 0 as Monday).
    assert [d.strftime("%a %d") for d in fires("0 3 * * 0")] == ["Sun 09", "Sun 16", "Sun 23"]
    assert [d.strftime("%a") for d in fires("0 3 * * 7", count=1)] == ["Sun"]
    assert [d.strftime("%a") for d in fires("30 2 * * 1-5", count=5)] == [
        "Tue", "Wed", "Thu", "Fri", "Mon"]
    assert [d.strftime("%a") for d in fires("0 3 * * 0-6", count=2)] == ["Tue", "Wed"]
    assert [d.strftime("%a") for d in fires("0 3 * * sat,sun", count=2)] == ["Sat", "Sun"]
    assert [d.strftime("%a") for d in fires("0 3 * * */2", count=4)] == ["Tue", "Thu", "Sat", "Sun"]


def test_optional_seconds_field():
    assert fires("30 0 3 * * *", count=1) == [datetime(2024, 6, 4, 3, 0, 30, tzinfo=TZ)]


@pytest.mark.parametrize("expr", ["0 3 * *", "0 25 * * *", "0 3 * * 8", "0 3 * * 5-2", "x 3 * * *"])
def test_bad_expressions(expr):
    with pytest.raises(ScheduleError):
        parse_schedule(expr, TZ)


def test_missed_run():
    trigger = parse_schedule("0 3 * * *", TZ)
    monday_3 = datetime(2024, 6, 3, 3, 0, tzinfo=TZ)
    # The NAS slept from Sunday night to Monday noon: Monday 03:00 was missed.
    assert missed_run(trigger, datetime(2024, 6, 2, 23, 0, tzinfo=TZ), MONDAY) == monday_3
    # It ran at 03:00 (exactly) and it is noon now: nothing missed.
    assert missed_run(trigger, monday_3, MONDAY) is None
    assert missed_run(trigger, monday_3 + timedelta(minutes=5), MONDAY) is None
    # Off for a week: one catch-up run (the first missed time), not seven.
    assert missed_run(trigger, monday_3 - timedelta(days=7), MONDAY) == monday_3 - timedelta(days=6)
    # Never ran: due at once.
    assert missed_run(trigger, None, MONDAY) == MONDAY


def test_last_run_round_trip():
    moment = datetime(2024, 6, 3, 1, 0, 0, 123456, tzinfo=UTC)
    text = format_last_run(moment.astimezone(TZ))
    assert text == "2024-06-03T01:00:00.123456+00:00"
    assert parse_last_run(text) == moment
    assert parse_last_run("2024-06-03T01:00:00") == datetime(2024, 6, 3, 1, tzinfo=UTC)
    assert parse_last_run("garbage") is None
    assert parse_last_run(None) is None


class Store:
    """The last-run record (the daemon keeps it in the database)."""

    def __init__(self, last: datetime | None) -> None:
        self.last = last
        self.saved: list[datetime] = []

    def load(self) -> datetime | None:
        return self.last

    def save(self, moment: datetime) -> None:
        self.last = moment
        self.saved.append(moment)


class Job:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls = 0
        self.catch_ups: list[bool] = []
        self.fail_first = fail_first
        self.called = threading.Event()

    def __call__(self, catch_up: bool) -> None:
        self.calls += 1
        self.catch_ups.append(catch_up)
        self.called.set()
        if self.fail_first and self.calls == 1:
            raise RuntimeError("disk on fire")


def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def near_future_schedule(seconds: float) -> str:
    at = datetime.now(TZ) + timedelta(seconds=seconds)
    return f"{at.second} {at.minute} {at.hour} * * *"


def test_runs_on_a_near_future_trigger():
    store = Store(datetime.now(UTC))  # ran just now: no catch-up
    job = Job()
    scheduler = NightlyScheduler(near_future_schedule(2), job, load_last_run=store.load,
                                 save_last_run=store.save, timezone=TZ)
    before = datetime.now(UTC)
    assert scheduler.start() is None
    try:
        assert scheduler.next_run() > datetime.now(TZ)
        wait_until(lambda: store.saved)
        assert job.catch_ups == [False]
        assert store.saved[0] >= before
        # The next run is tomorrow.
        assert scheduler.next_run() > datetime.now(TZ) + timedelta(hours=23)
    finally:
        scheduler.shutdown()


def test_missed_run_is_caught_up_at_start():
    store = Store(datetime.now(UTC) - timedelta(days=2))
    job = Job()
    scheduler = NightlyScheduler("0 3 * * *", job, load_last_run=store.load,
                                 save_last_run=store.save, timezone=TZ)
    missed = scheduler.start()
    try:
        assert missed is not None and missed < datetime.now(TZ)
        wait_until(lambda: store.saved)
        assert job.catch_ups == [True]
        assert scheduler.next_run().hour == 3  # the regular schedule stays in place
    finally:
        scheduler.shutdown()


def test_no_catch_up_when_the_last_run_is_recent():
    store = Store(datetime.now(UTC))
    job = Job()
    scheduler = NightlyScheduler("0 3 * * *", job, load_last_run=store.load,
                                 save_last_run=store.save, timezone=TZ)
    assert scheduler.start() is None
    try:
        assert not job.called.wait(1.0)
    finally:
        scheduler.shutdown()


def test_failed_run_is_not_recorded():
    store = Store(None)  # never ran
    job = Job(fail_first=True)
    scheduler = NightlyScheduler("0 3 * * *", job, load_last_run=store.load,
                                 save_last_run=store.save, timezone=TZ)
    scheduler.start()
    try:
        wait_until(lambda: job.calls == 1)
        time.sleep(0.2)
        assert store.saved == []  # the next start catches up again
        assert scheduler.run_now() is True
        assert len(store.saved) == 1
    finally:
        scheduler.shutdown()
