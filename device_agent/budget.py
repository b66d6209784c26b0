"""The monitor's CPU budget: how many rows it can afford to sketch, as a share of the time spent in inference.

On a Raspberry Pi the sketcher competes with the model for the same cores. ``[monitor] max_cpu_fraction``
(default 0.1) says how much of the inference time sketching may take; when it would take more, the
monitor sketches every ``every``-th row (by row id, so the sample is deterministic and blind to what the
rows hold: the drift tests, which count the rows actually sketched, keep their false-alarm rate) and says
so: each summary carries the rate, and ``/metrics`` shows it.

The budget looks at what sketching really cost (the background thread's time in the sketch, per call)
against the inference time of the requests it was handed, and moves ``every`` to what would have fit,
with a margin so that it does not flap. The sketch's cost is the background thread's own CPU time
(``time.thread_time``), so a thread that was preempted is not taken for a slow sketch.

The sample shrinks (``every`` grows) at once and grows back at most twofold a look, so a burst of traffic
after an idle spell is not recorded in full before the budget has seen what it costs.

A device that is mostly idle is not sampled for being idle: below ``BUSY_SHARE`` of the wall time in
inference, the allowance is computed from that share of the wall time, so the sketcher may always use
``max_cpu_fraction * BUSY_SHARE`` of one core (2.5 % by default). The budget protects the model when it
is busy; one request a second is sketched in full however slow a sketch is next to a tiny model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_CPU_FRACTION = 0.1  # the agent's default ([monitor] max_cpu_fraction); 0 turns the budget off
MOST_EVERY = 1000  # one row in a thousand at least: enough for a window's drift test on any busy device
BUSY_SHARE = 0.25  # below a quarter of the wall time in inference, the allowance is computed from a quarter
DECIDE_INFERENCE_SECONDS = 0.02  # look again after this much inference time ...
DECIDE_WALL_SECONDS = 1.0  # ... or this much wall time, whichever comes first
HEADROOM = 0.8  # aim at this share of the allowance; grow the sample again only below half of it


class CpuBudget:
    """``every``: the monitor sketches rows whose id is a multiple of it (1: every row)."""

    def __init__(self, fraction: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction = float(fraction)
        self.every = 1
        self.clock = clock
        self._sketch = self._inference = 0.0
        self._since = clock()

    @property
    def rate(self) -> float:
        return 1.0 / self.every

    def spent(self, sketch_seconds: float, inference_seconds: float) -> None:
        """Sketching took ``sketch_seconds`` for requests whose inference took ``inference_seconds``."""
        if self.fraction <= 0:  # no budget: every row is sketched
            return
        self._sketch += sketch_seconds
        self._inference += inference_seconds
        wall = self.clock() - self._since
        if self._inference < DECIDE_INFERENCE_SECONDS and wall < DECIDE_WALL_SECONDS:
            return
        allowance = self.fraction * max(self._inference, BUSY_SHARE * wall)
        if self._sketch > HEADROOM * allowance or self._sketch < HEADROOM * allowance / 2:
            # the sketch's cost is about proportional to the rows kept, so this ``every`` would have fit
            wanted = math.ceil(self.every * self._sketch / (HEADROOM * allowance)) if allowance > 0 else MOST_EVERY
            # the sample shrinks at once but grows at most twofold a look: after an idle spell the allowance
            # is large, and a burst of traffic recorded in full would fill the backlog before the next look
            self.every = max(1, min(MOST_EVERY, max(wanted, -(-self.every // 2))))  # (half, rounded up)
        self._sketch = self._inference = 0.0
        self._since = self.clock()
