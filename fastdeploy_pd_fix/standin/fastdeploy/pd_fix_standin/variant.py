"""Which upstream release the stand-in imitates, read once from the environment at import time.

``FD_STANDIN_RELEASE``: ``pre7872`` (early layer-0 signals dropped), ``7872`` (pending buffer, registered tasks of
a signal batched together) or ``8034`` (every layer-0 task its own batch). ``FD_STANDIN_7724``: ``1`` for releases
with #7724 (no finish_add_cache_task report/barrier; the send loop waits for registration). ``FD_STANDIN_OP_ARGS``:
``3`` for ``get_output_kv_signal(buf, rank_id, 0)``, ``4`` for ``get_output_kv_signal(buf, rank_id, device_id, 1)``.
``FD_STANDIN_PARALLEL_SEND``: ``1`` for develop's parallel send loop (#7931): each slot's task is read in a worker
thread of the send loop's pool.
"""

import os

from .contract import ENV_OP_ARGS, ENV_PARALLEL_SEND, ENV_RELEASE, ENV_WITH_7724, RELEASES


def _read_choice(name, default, choices):
    value = os.getenv(name, default).strip()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


RELEASE = _read_choice(ENV_RELEASE, "7872", RELEASES)
WITH_7724 = _read_choice(ENV_WITH_7724, "0", ("0", "1")) == "1"
KV_SIGNAL_OP_ARGS = int(_read_choice(ENV_OP_ARGS, "3", ("3", "4")))
PARALLEL_SEND = _read_choice(ENV_PARALLEL_SEND, "0", ("0", "1")) == "1"
