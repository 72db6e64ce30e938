"""The engine side of the slot-lifecycle notices: which notice an engine event puts, read off FastDeploy's objects.

One copy of the engine-facing rules, shared by the plugin's engine-side patch
(``fastdeploy_pd_fix.plugin.engine.patch`` wraps ``ResourceManagerV1`` and puts what these functions return) and by a
FastDeploy that carries the fix (``make-patch`` copies this package; ``ResourceManagerV1`` then calls them itself, see
the patch message):

* :func:`abort_batches`: before ``recycle_abort_task(request_id)`` frees an aborted request's slot, the two batches
  to put, one after the other: the ``abort`` notice, then a ``fence``. A put returns only once every messager rank
  has read the previous batch, so the slot's next admission put returns only after every rank has read the fence,
  i.e. has handled the abort (release rule 9).
* :func:`orphan_batch`: before ``add_request_in_p(requests)``, one batch with an ``orphan`` notice for each request
  without ``disaggregate_info`` (computed without transfer).
* :class:`AnnouncedPut`: the engine's ``put_cache_info``, whose first batch starts with an ``engine`` notice, so that
  every messager rank knows at the same stream position whether the engine puts notices at all. It rides on the
  first batch instead of being put alone: a put waits until every messager client has polled, and the messagers
  start after the connector (FastDeploy's engine builds the connector in ``__init__``, the messagers in ``start``).

Only a prefill instance's messagers read the cache-info mailbox; elsewhere a second put would block for ever, so
both return nothing off the prefill role. Facts relied on (public FastDeploy code): ``recycle_abort_task`` frees the
slot only for a request in ``requests`` and ``to_be_aborted_req_id_set``; ``Request.idx`` is the slot;
``prefill_end_index`` is set to the end of every chunk the scheduler hands to a forward step and starts at 0
(``num_computed_tokens`` cannot serve: it holds a prefix-cache hit's length before any chunk, and the abort path
resets it to 0); the role is ``config.scheduler_config.splitwise_role``.

Standard library only, relative imports only.
"""

from __future__ import annotations

import itertools
import operator
import threading
from typing import Callable, List, Optional

from ..policy.notice import abort_notice, encode, engine_notice, fence_notice, orphan_notice

#: The only role whose messagers read the cache-info mailbox.
PREFILL_ROLE = "prefill"
#: Fence serials of this process, for :func:`abort_batches` (``next`` on a count is atomic under the GIL).
FENCE_SERIALS = itertools.count(1)


def splitwise_role(resource_manager) -> Optional[str]:
    """The instance's role (``prefill``, ``decode``, ``mixed``), where FastDeploy keeps it; None if not found."""
    engine_config = getattr(resource_manager, "config", None)
    role = getattr(getattr(engine_config, "scheduler_config", None), "splitwise_role", None)
    return role if role is not None else getattr(engine_config, "splitwise_role", None)


def launched_prefill_end(request) -> Optional[int]:
    """``emitted_end``: the end of the request's last prefill chunk handed to a forward step; None when none was.

    A chunk has at least one token, so ``prefill_end_index == 0`` means no chunk (a prefix-cache hit alone does not
    count). A request without the attribute raises AttributeError: no notice then (not knowing is not None)."""
    end = operator.index(request.prefill_end_index)
    return end if end > 0 else None


def abort_batches(resource_manager, request_id, fence_serial) -> List[list]:
    """The batches to put, in order, before ``recycle_abort_task(request_id)`` runs: ``[[abort], [fence]]``, or
    ``[]`` when the original frees nothing (not a live request, not taken for abort yet) or off the prefill role."""
    if splitwise_role(resource_manager) != PREFILL_ROLE:
        return []
    request = resource_manager.requests.get(request_id)
    if request is None:
        return []
    aborting = getattr(resource_manager, "to_be_aborted_req_id_set", None)
    if aborting is not None and request_id not in aborting:
        return []
    notice = abort_notice(request.idx, request_id, launched_prefill_end(request))
    return [[encode(notice)], [encode(fence_notice(fence_serial))]]


def orphan_batch(resource_manager, requests) -> list:
    """The batch to put before ``add_request_in_p(requests)``: an orphan notice per request without
    ``disaggregate_info``; ``[]`` when there is none or off the prefill role. ``requests`` must be a list or tuple
    (an iterator would be consumed before the original sees it): TypeError otherwise."""
    if splitwise_role(resource_manager) != PREFILL_ROLE:
        return []
    if not isinstance(requests, (list, tuple)):
        raise TypeError(f"add_request_in_p got a {type(requests).__name__}, expected a list")
    return [
        encode(orphan_notice(request.idx, request.request_id, len(request.prompt_token_ids)))
        for request in requests
        if request.disaggregate_info is None
    ]


class AnnouncedPut:
    """The engine's ``put_cache_info`` with an ``engine`` notice at the head of its first batch (prefill role only:
    elsewhere nobody reads the mailbox). A put that comes while the first one is under way waits for it, so the
    announcement is the first item of the stream on every rank."""

    def __init__(self, put: Callable, announcer: str):
        self.__wrapped__ = put
        self._announcement = encode(engine_notice(announcer))
        self._lock = threading.Lock()
        self._announced = False

    def __call__(self, batch, *args, **kwargs):
        if not self._announced:
            with self._lock:
                if not self._announced:
                    result = self.__wrapped__([self._announcement, *batch], *args, **kwargs)
                    self._announced = True
                    return result
        return self.__wrapped__(batch, *args, **kwargs)
