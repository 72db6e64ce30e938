"""What the harness and the stand-in's rank processes agree on: environment variable names, release variants and
schedule event tokens.

Imported by the ranks (as ``fastdeploy._standin.contract``) and by the harness (as
``fastdeploy_pd_fix.standin.fastdeploy._standin.contract``), so it imports nothing and reads nothing at import time.
"""

import re

#: The upstream releases the stand-in imitates (see :mod:`.variant`).
RELEASES = ("pre7872", "7872", "8034")
ENV_RELEASE = "FD_STANDIN_RELEASE"
ENV_WITH_7724 = "FD_STANDIN_7724"
ENV_OP_ARGS = "FD_STANDIN_OP_ARGS"
#: The scenario JSON file a rank plays, and the directory it writes its progress file into.
ENV_SCENARIO = "FD_STANDIN_SCENARIO"
ENV_OUT = "FD_STANDIN_OUT"
#: ``R:N``: rank R dies by SIGKILL right after its send loop took its N-th batch (tests only).
ENV_EXIT_AFTER_BATCHES = "FD_STANDIN_EXIT_AFTER_BATCHES"

SIGNAL = "sig"
REGISTRATION = "reg"
EVENT_TOKEN = re.compile(rf"^({SIGNAL}|{REGISTRATION})(\d+)$")


def parse_event(token):
    """``"sig3"`` -> ``("sig", 3)``."""
    match = EVENT_TOKEN.match(str(token))
    if match is None:
        raise ValueError(f"bad schedule event {token!r}: expected sig<N> or reg<N>")
    return match.group(1), int(match.group(2))
