"""Failpoints: named places where the fault tests make this process fail for real.

A failpoint is inert unless `$ADVCAP_FAULTS` names it. The tests use them to kill a process with
SIGKILL at an exact place (between writing a checkpoint's files and committing it, between the
predictions and the metrics record, ...), to freeze a rank (SIGSTOP), to raise an error on one
rank only, or to make one rank's loss NaN at one step, and then check what a user would see:
exit codes, messages, files on disk, resumed weights. The code around a failpoint is the
production code; nothing is replaced.

    ADVCAP_FAULTS="checkpoint.before_commit=kill"                 # the first time it is reached
    ADVCAP_FAULTS="step.loss=nan@rank=1@step=3"                   # only on rank 1, at step 3
    ADVCAP_FAULTS="checkpoint.files_written=kill@hit=2,eval.after_predictions=raise"

Actions: `kill` (SIGKILL this process), `stop` (SIGSTOP: a hung rank), `raise` (FaultInjected),
and value faults such as `nan` that the call site reads with `active()`. Qualifiers: `rank=R`
(global rank, $RANK), `step=S` (the step the call site passes), `hit=N` (the N-th time the point
is reached in this process with the other qualifiers matching; default 1).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Optional

VARIABLE = "ADVCAP_FAULTS"
_hits: Counter = Counter()


class FaultInjected(RuntimeError):
    """Raised by a failpoint whose action is `raise`."""


@dataclass(frozen=True)
class _Fault:
    point: str
    action: str
    rank: Optional[int] = None
    step: Optional[int] = None
    hit: int = 1


def _parse(spec: str) -> list[_Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, rest = entry.partition("=")
        action, *qualifiers = rest.split("@")
        values = dict(q.split("=", 1) for q in qualifiers)
        faults.append(_Fault(point, action, *(int(values[k]) if k in values else None for k in ("rank", "step")),
                             int(values.get("hit", 1))))
    return faults


def _match(point: str, step: Optional[int]) -> Optional[_Fault]:
    spec = os.environ.get(VARIABLE)
    if not spec:
        return None
    from advcap.distributed import launch_rank

    rank = launch_rank()
    for fault in _parse(spec):
        if fault.point != point or (fault.rank is not None and fault.rank != rank):
            continue
        if fault.step is not None and fault.step != step:
            continue
        _hits[fault] += 1
        if _hits[fault] == fault.hit:
            return fault
    return None


def point(name: str, step: Optional[int] = None) -> None:
    """A place where a `kill`, `stop` or `raise` fault may strike."""
    fault = _match(name, step)
    if fault is None:
        return
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "raise":
        raise FaultInjected(f"fault injected at {name} ({VARIABLE})")


def active(name: str, action: str, step: Optional[int] = None) -> bool:
    """True if a value fault (e.g. `nan`) is set for this point, rank and step."""
    fault = _match(name, step)
    return fault is not None and fault.action == action
