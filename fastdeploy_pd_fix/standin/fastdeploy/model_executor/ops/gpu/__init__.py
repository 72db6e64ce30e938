"""Stand-in of the custom GPU ops package: only ``get_output_kv_signal``, fed by the scenario script.

Upstream's op is a SysV message-queue read in C++; here the messages come from :mod:`fastdeploy.pd_fix_standin.script`.
"""

import numpy as np
from fastdeploy.pd_fix_standin import script as standin_script

MAX_ENGINE_SLOTS = 512
KV_SIGNAL_LENGTH = MAX_ENGINE_SLOTS * 3 + 2
#: Layer of every scripted signal: only layer 0 starts a transfer, so only layer 0 is scripted.
SCRIPTED_LAYER_ID = 0


def get_output_kv_signal(*args):
    """Write the next kv signal into ``buf`` in place.

    Accepts both signatures seen across releases, ``(buf, rank_id, wait_flag)`` and
    ``(buf, rank_id, device_id, wait_flag)``. Layout: ``[tasks_count, layer_id, (slot, chunk_token_offset,
    current_chunk_len) x tasks_count, -1 ...]``. With no signal due it writes -1 into ``buf[0]`` and ``buf[1]``
    and returns (``wait_flag`` 0) or blocks until one is due (``wait_flag`` truthy), like the C++ op.
    """
    if len(args) == 3:
        buf, _rank_id, wait_flag = args
    elif len(args) == 4:
        buf, _rank_id, _device_id, wait_flag = args
    else:
        raise TypeError(f"get_output_kv_signal takes 3 or 4 positional arguments, got {len(args)}")
    tasks = standin_script.next_kv_signal(block=bool(int(wait_flag)))
    if tasks is None:
        buf[0:2] = -1
        return
    values = np.full([KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    values[0] = len(tasks)
    values[1] = SCRIPTED_LAYER_ID
    for position, (slot, chunk_token_offset, current_chunk_len) in enumerate(tasks):
        values[2 + 3 * position : 5 + 3 * position] = (slot, chunk_token_offset, current_chunk_len)
    buf.set_value(values)
