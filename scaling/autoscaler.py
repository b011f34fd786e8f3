"""The autoscaler: keeps each TE group between its min and max size as load comes and goes.

Every `interval_s`, or at once when the cluster has to hold a task, it reads the group
from the cluster (`scheduler/cluster.py`):
- scale out by one when work waits: tasks held because no TE is ready (a group at zero
  starts its first TE at once) or more than `waiting_per_te` sequences queued in the TEs'
  batchers per TE; one TE start at a time, so a burst does not overshoot to max, and
  only while another TE fits on some host (`max_tes` None: as many as fit);
- scale in by one after the group has held no task for `idle_s`, down to `min_tes`
  (0 allows scale to zero: later requests are held until a TE is ready).
New TEs come from the warm template, so a scale-out takes well under a second.
"""
import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("deepflow.autoscaler")


@dataclass
class ScalePolicy:
    min_tes: int
    max_tes: int | None         # None: as many as the hosts fit
    waiting_per_te: int = 4
    idle_s: float = 30.0
    interval_s: float = 0.25


async def autoscale(cluster, group: str, policy: ScalePolicy) -> None:
    idle_since = time.monotonic()
    while not cluster.closing:
        try:
            await asyncio.wait_for(cluster.work_held.wait(), policy.interval_s)
        except TimeoutError:
            pass
        cluster.work_held.clear()
        tes = [te for te in cluster.groups[group] if not te.retiring]
        size, starting = cluster.target[group], any(te.state == "starting" for te in tes)
        ready = [te for te in tes if te.state == "ready"]
        waiting = len(cluster.pending[group]) + sum(te.stats.waiting for te in ready)
        busy = len(cluster.pending[group]) + sum(te.load for te in tes)
        if busy:
            idle_since = time.monotonic()
        grow = size < (policy.max_tes if policy.max_tes is not None else size + 1) and cluster.room(group) > 0
        if (size < policy.min_tes and cluster.room(group) > 0) or (grow and not starting and (
                cluster.pending[group] or waiting > policy.waiting_per_te * len(ready))):
            log.info("group %s: scale out to %d (%d waiting)", group, size + 1, waiting)
            cluster.scale_to(group, size + 1)
        elif (policy.max_tes is not None and size > policy.max_tes) or (
                size > policy.min_tes and time.monotonic() - idle_since > policy.idle_s):
            log.info("group %s: scale in to %d (idle %.0f s)", group, size - 1, time.monotonic() - idle_since)
            cluster.scale_to(group, size - 1)
            idle_since = time.monotonic()
