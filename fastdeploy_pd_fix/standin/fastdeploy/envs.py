"""Environment switches read by the stand-in, evaluated on attribute access like upstream's ``fastdeploy.envs``."""

import os

environment_variables = {
    # 1: the v1 KV-cache scheduler, whose cache messager is CacheMessagerV1.
    "ENABLE_V1_KVCACHE_SCHEDULER": lambda: int(os.getenv("ENABLE_V1_KVCACHE_SCHEDULER", "1")),
    "FD_LOG_DIR": lambda: os.getenv("FD_LOG_DIR", "log"),
}


def __getattr__(name):
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
