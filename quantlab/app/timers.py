"""Timers of a run that acts: the real APScheduler, in the background, for as long as a block runs."""
from __future__ import annotations

import contextlib
import logging
from datetime import timezone
from typing import Callable, Iterator


def quiet_scheduler_logs() -> None:
    """A round still running when its next run is due is skipped by design (an act round that acts
    long, a third renewal round while two wait for slow hosts); APScheduler would warn each time."""
    logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


@contextlib.contextmanager
def every(seconds: float, job: Callable[[], None], *, name: str, overlapping: int = 1) -> Iterator[None]:
    """Run `job` every `seconds` while the block runs, the first time one interval from now
    (`overlapping`: how many runs may be under way at once), and wait for a run under way when the
    block ends."""
    # Imported here: most commands never start a timer, and APScheduler costs each start ~35 ms.
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    quiet_scheduler_logs()
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(job, IntervalTrigger(seconds=seconds), id=name, max_instances=overlapping, coalesce=True,
                      misfire_grace_time=None)
    scheduler.start()
    try:
        yield
    finally:
        scheduler.shutdown(wait=True)
