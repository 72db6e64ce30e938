"""What the harness and the stand-in's rank processes agree on: environment variable names, release variants,
schedule event tokens and the cache-info parts a registration entry delivers.

Imported by the ranks (as ``fastdeploy.pd_fix_standin.contract``) and by the harness (as
``fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.contract``), so it imports nothing and reads nothing at import
time.
"""

import re

#: The upstream releases the stand-in imitates (see :mod:`.variant`).
RELEASES = ("pre7872", "7872", "8034")
ENV_RELEASE = "FD_STANDIN_RELEASE"
ENV_WITH_7724 = "FD_STANDIN_7724"
ENV_OP_ARGS = "FD_STANDIN_OP_ARGS"
#: ``1``: the send loop reads each slot's task in a worker thread of its own pool, as develop's parallel send (#7931).
ENV_PARALLEL_SEND = "FD_STANDIN_PARALLEL_SEND"
#: The scenario JSON file a rank plays, and the directory it writes its progress file into.
ENV_SCENARIO = "FD_STANDIN_SCENARIO"
ENV_OUT = "FD_STANDIN_OUT"
#: ``R:N``: rank R dies by SIGKILL right after its send loop took its N-th batch (tests only).
ENV_EXIT_AFTER_BATCHES = "FD_STANDIN_EXIT_AFTER_BATCHES"

SIGNAL = "sig"
REGISTRATION = "reg"
#: A registration read ``reg<N>@barrier`` counts as acknowledged as soon as its ``cache_info_barrier`` returned, so
#: the rank's next event may come while the read's tasks are still being stored: the window an engine that does not
#: wait for registration (#7724 on) leaves open, and where ``FD_PD_FIX_INJECT=registration_after_barrier`` sleeps.
AT_BARRIER = "@barrier"
EVENT_TOKEN = re.compile(rf"^({SIGNAL}|{REGISTRATION})(\d+)$|^({REGISTRATION})(\d+){AT_BARRIER}$")
#: Schedule controls of the send thread, applied when the schedule reaches them (no thread reads them):
#: ``stall``: the send thread takes no batch from the queue until ``go``; ``hold``: it reads no task of a batch it
#: took until ``go``; ``go``: ends both; ``drain``: the next event is delivered only once the send thread has no
#: batch queued or held (it sent everything released so far).
STALL, HOLD, GO, DRAIN = "stall", "hold", "go", "drain"
CONTROLS = (STALL, HOLD, GO, DRAIN)

#: ``parts`` of a registration entry: both cache-info halves (the default), the prefill side's only (its decode side
#: comes in a later entry, or never), or the decode side's only (a repeated or late D-part).
BOTH_PARTS, PREFILL_PART, DECODE_PART = "both", "prefill", "decode"
PARTS = (BOTH_PARTS, PREFILL_PART, DECODE_PART)


#: A registration-read entry with this key is an engine notice, not a request (``"abort"``: with ``emitted_end``;
#: ``"orphan"``: with ``need_prefill_tokens``). The stand-in engine puts it only where the plugin's engine-side patch
#: would (``fastdeploy_pd_fix.config.engine_notices()`` on in the rank's environment); an abort comes with its fence.
NOTICE_ENTRY = "notice"


def is_notice_entry(entry):
    return NOTICE_ENTRY in entry


def parse_event(token):
    """``"sig3"`` -> ``("sig", 3)``, ``"reg1@barrier"`` -> ``("reg", 1)``; a control token -> ``("stall", None)``."""
    if token in CONTROLS:
        return token, None
    match = EVENT_TOKEN.match(str(token))
    if match is None:
        expected = f"sig<N>, reg<N>, reg<N>{AT_BARRIER} or one of {', '.join(CONTROLS)}"
        raise ValueError(f"bad schedule event {token!r}: expected {expected}")
    kind, index = (group for group in match.groups() if group is not None)
    return kind, int(index)


def acknowledged_at_barrier(token):
    """True for ``reg<N>@barrier``."""
    return str(token).endswith(AT_BARRIER)
