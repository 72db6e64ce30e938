"""The release policies the explorer drives, and snapshots of their state.

``ordered`` and ``upstream`` are exactly :func:`fastdeploy_pd_fix.policy.release.make_release`; ``pr7872`` is a small
model, defined here, of the behaviour before #8034 (per signal, the tasks whose slot is registered go out together as
one batch; the others wait in a latest-per-slot pending buffer and are recovered one by one at registration).

The explorer forks a rank's policy at every event and merges ranks whose states are equal, for any
:class:`~fastdeploy_pd_fix.policy.release.ReleasePolicy`. It reads and rebuilds a policy's state through the copy
protocol (``__getstate__``/``__setstate__``, what ``copy.deepcopy`` and pickle use, so a policy class can customise
both), recursing into dicts, lists, deques and nested objects and sharing immutable values: the state of a policy is
plain data (containers of ints, strings, tuples and frozen registrations). ``copy.deepcopy`` would make the same
copies several times slower, since it also copies every tuple of the state.
"""

from __future__ import annotations

from collections import deque
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

from fastdeploy_pd_fix.policy.release import (
    RELEASE_MODES,
    Registration,
    Released,
    ReleasePolicy,
    SignalTask,
    check_signal_tasks,
    make_release,
)

PR7872 = "pr7872"
#: The modes ``verify`` explores: the shipped policies and the pr7872 model.
VERIFY_MODES = RELEASE_MODES + (PR7872,)


class Pr7872Release:
    """Model of #7872: registered tasks of a signal form one batch; the others wait, latest per slot.

    Only for showing that the explorer finds the seed deadlock (s1).
    """

    mode = PR7872

    def __init__(self):
        self._pending: Dict[int, SignalTask] = {}

    def add_signal(self, tasks: Sequence[SignalTask], registered: Mapping[int, int]) -> Released:
        ready = []
        for slot, chunk_offset, prefilled_token_num in check_signal_tasks(tasks):
            if slot in registered:
                ready.append((slot, prefilled_token_num))
            else:
                self._pending[slot] = (slot, chunk_offset, prefilled_token_num)  # latest signal per slot wins
        released = Released()
        if ready:
            released.batches.append(tuple(ready))  # whatever this rank happens to have registered: timing-dependent
        return released

    def add_registration(self, registration: Registration, registered: Mapping[int, int]) -> Released:
        released = Released()
        if registration.slot in self._pending:
            slot, _, prefilled_token_num = self._pending.pop(registration.slot)
            released.batches.append(((slot, prefilled_token_num),))
        return released

    def waiting_signals(self) -> List[Tuple[SignalTask, ...]]:
        return [(task,) for task in self._pending.values()]

    def has_waiting(self) -> bool:
        return bool(self._pending)

    def open_registrations(self) -> Dict[int, List[str]]:
        return {}  # like upstream, the model keeps no registrations of its own


def make_policy(mode: str) -> ReleasePolicy:
    """A fresh release policy for ``mode`` (one of :data:`VERIFY_MODES`)."""
    if mode == PR7872:
        return Pr7872Release()
    return make_release(mode)


# Registrations are frozen; the explorer's carry a string as their task, so they can be shared like tuples.
_IMMUTABLE = (int, str, bytes, float, bool, type(None), tuple, frozenset, Registration)


def clone_policy(policy: ReleasePolicy) -> ReleasePolicy:
    """An independent copy of ``policy`` (what ``copy.deepcopy`` returns, with immutable values shared)."""
    return _copy(policy)


def policy_snapshot(policy: ReleasePolicy) -> Hashable:
    """A hashable value that is equal for two policies exactly when their states are equal.

    Insertion order is kept: it can matter for what the policy releases next."""
    return _freeze(policy)


def _state(value):
    """An object's state as the copy protocol reads it: ``__getstate__()`` (every object has it from Python 3.11
    on), else its ``__dict__`` (what that default returns)."""
    getstate = getattr(value, "__getstate__", None)
    return getstate() if getstate is not None else value.__dict__


def _copy(value):
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        return {key: _copy(item) for key, item in value.items()}
    if kind is list:
        return [_copy(item) for item in value]
    if kind is deque:
        return deque([_copy(item) for item in value], value.maxlen)
    twin = kind.__new__(kind)  # rebuilt as copy and pickle rebuild it: no __init__, then the state
    state = _state(value)
    if hasattr(twin, "__setstate__"):
        twin.__setstate__(_copy(state))
    elif isinstance(state, dict):
        twin.__dict__.update(_copy(state))
    elif state is not None:
        raise TypeError(f"cannot copy a {kind.__name__}: its state is not a dict and it has no __setstate__")
    return twin


def _freeze(value):
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        return tuple((key, _freeze(item)) for key, item in value.items())
    if kind is list or kind is deque:
        return tuple(_freeze(item) for item in value)
    return (kind, _freeze(_state(value)))
