"""The nightly job inside the daemon: APScheduler 3.x, plus a catch-up for runs the NAS slept through.

APScheduler alone loses missed runs: its default misfire grace time is one second, and re-adding a
stored job with ``replace_existing=True`` recomputes the next run time and silently drops the one
that was missed. So the jobs live in memory only, and the last *successful* run is recorded in the
database (``Meta`` key ``last_nightly_run``, ISO 8601 UTC). At start-up, if a scheduled time has
passed since that run (or it never ran), the job runs once right away. While the daemon runs, a run
delayed by a suspended machine still happens once (no grace limit, coalesced).

The schedule is a crontab expression in local time: ``minute hour day month weekday``, weekday 0
or 7 = Sunday as in crontab(5) (APScheduler 3 itself counts 0 = Monday). An optional sixth,
leading field gives seconds.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

log = logging.getLogger(__name__)

META_LAST_NIGHTLY = "last_nightly_run"
JOB_ID = "nightly"

_CRON_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]  # crontab numbering


class ScheduleError(ValueError):
    """The cron expression is not valid; the message says why."""


def _weekday_field(field: str) -> str:
    """Translate a crontab weekday field (0/7 = Sunday) into APScheduler 3's names."""
    if not re.search(r"\d", field):
        return field  # "*", names ("mon-fri") mean the same in both
    days: list[str] = []
    for part in field.split(","):
        match = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", part)
        if not match:
            raise ScheduleError(f"weekday field {field!r}: cannot read {part!r}")
        start_s, end_s, step_s = match.groups()
        if start_s == "*":
            start, end = 0, 6
        else:
            start = int(start_s)
            end = int(end_s) if end_s is not None else (7 if step_s else start)
        step = int(step_s) if step_s else 1
        if not (0 <= start <= 7 and 0 <= end <= 7 and start <= end and step >= 1):
            raise ScheduleError(f"weekday field {field!r}: {part!r} is out of range 0-7")
        days.extend(_CRON_WEEKDAYS[d] for d in range(start, end + 1, step))
    return ",".join(dict.fromkeys(days))


def parse_schedule(expr: str, timezone: tzinfo | str | None = None) -> CronTrigger:
    """A CronTrigger for a crontab expression (5 fields, or 6 with leading seconds)."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ScheduleError(f"cron expression {expr!r} must have 5 fields "
                            "(minute hour day month weekday) or 6 (with leading seconds)")
    second, minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_weekday_field(weekday), timezone=timezone)
    except ScheduleError:
        raise
    except ValueError as e:
        raise ScheduleError(f"cron expression {expr!r}: {e}") from None


def missed_run(trigger: CronTrigger, last_run: datetime | None, now: datetime) -> datetime | None:
    """The first scheduled time after ``last_run`` if it is not later than ``now``, else None.

    A job that never ran successfully (``last_run`` None) is due at once.
    """
    if last_run is None:
        return now
    # The trigger's answer is inclusive (a fire time equal to "now" counts): the run at
    # ``last_run`` itself is not a missed one.
    due = trigger.get_next_fire_time(None, last_run + timedelta(microseconds=1))
    return due if due is not None and due <= now else None


def format_last_run(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def parse_last_run(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        log.warning("ignoring unreadable %s %r", META_LAST_NIGHTLY, value)
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class NightlyScheduler:
    """Runs ``job(catch_up)`` on the cron schedule and catches up a missed run at start-up
    (then with ``catch_up=True``).

    ``load_last_run`` / ``save_last_run`` read and write the last successful run (the daemon keeps
    it in the database); ``job`` raising means the run failed and is not recorded. Runs never
    overlap: one scheduled while another is still going is skipped (coalesced).
    """

    def __init__(
        self,
        schedule: str,
        job: Callable[[bool], None],
        *,
        load_last_run: Callable[[], datetime | None],
        save_last_run: Callable[[datetime], None],
        timezone: tzinfo | str | None = None,
    ) -> None:
        self.scheduler = BackgroundScheduler(timezone=timezone) if timezone else BackgroundScheduler()
        self.trigger = parse_schedule(schedule, self.scheduler.timezone)
        self.schedule = schedule
        self._job = job
        self._load_last_run = load_last_run
        self._save_last_run = save_last_run
        self._running = threading.Lock()
        self.runs = 0  # successful runs in this process

    def start(self) -> datetime | None:
        """Start the schedule; returns the missed time being caught up now, if any."""
        now = datetime.now(self.scheduler.timezone)
        last = self._load_last_run()
        missed = missed_run(self.trigger, last, now)
        self.scheduler.add_job(
            self.run_now, self.trigger, id=JOB_ID, name="nightly rescan and re-tag",
            misfire_grace_time=None, coalesce=True, max_instances=1,
        )
        if missed is not None:
            if last is None:
                log.info("nightly job never ran: running it now")
            else:
                log.info("nightly job missed its run at %s (last run %s): running it now",
                         missed.isoformat(timespec="minutes"),
                         last.astimezone(self.scheduler.timezone).isoformat(timespec="minutes"))
            self.scheduler.add_job(self.run_now, kwargs={"catch_up": True}, id=JOB_ID + "-catch-up",
                                   name="missed nightly run", misfire_grace_time=None)
        self.scheduler.start()
        log.info("nightly job scheduled (%s), next run %s", self.schedule,
                 self.next_run().isoformat(timespec="minutes") if self.next_run() else "never")
        return missed

    def reschedule(self, schedule: str) -> None:
        """Switch to another cron expression (configuration reload)."""
        trigger = parse_schedule(schedule, self.scheduler.timezone)
        self.scheduler.reschedule_job(JOB_ID, trigger=trigger)
        self.trigger, self.schedule = trigger, schedule

    def next_run(self) -> datetime | None:
        job = self.scheduler.get_job(JOB_ID)
        return job.next_run_time if job is not None else None

    def run_now(self, catch_up: bool = False) -> bool:
        """Run the job (unless a run is going on); record the time on success."""
        if not self._running.acquire(blocking=False):
            log.info("nightly job already running: skipping this run")
            return False
        try:
            started = datetime.now(UTC)
            try:
                self._job(catch_up)
            except InterruptedError:
                log.info("nightly job interrupted; it runs again at the next daemon start")
                return False
            except Exception:
                log.exception("nightly job failed; it runs again at the next scheduled time "
                              "or daemon start")
                return False
            self._save_last_run(started)
            self.runs += 1
            return True
        finally:
            self._running.release()

    def shutdown(self, wait: bool = False) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)
