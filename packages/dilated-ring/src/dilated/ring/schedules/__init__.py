"""The schedules of the block strategies, one module each, by the name ``strategy=`` takes.

Adding a strategy: a module here with a [`Schedule`][dilated.ring.schedule.Schedule] subclass
(its ``rounds`` moves the blocks for both passes; ``forward_sends``/``gradient_sends`` give its
cost), and one entry in ``SCHEDULES``. The functional op, the custom op, the cost model and the
checks read the names from here. (``"ulysses"`` is no block schedule: it exchanges heads, not
key/value blocks, and runs the single-GPU op on the whole sequence; see
`dilated.ring.ulysses`.)
"""

from __future__ import annotations

from dilated.ring.schedule import Schedule
from dilated.ring.schedules.allgather import AllGatherSchedule
from dilated.ring.schedules.ring import RingSchedule

__all__ = ["SCHEDULES", "get_schedule"]

#: Every block schedule by its ``strategy`` name.
SCHEDULES: dict[str, Schedule] = {s.name: s for s in (RingSchedule(), AllGatherSchedule())}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name not in SCHEDULES:
        raise ValueError(f"strategy must be one of {tuple(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]
