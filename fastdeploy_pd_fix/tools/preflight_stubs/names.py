"""Name resolution of the preflight tree (imported there as ``fastdeploy._preflight.names``).

Every generated ``fastdeploy.*`` module of the tree is empty but for ``__getattr__ = module_getattr``, so a name is
found by what it is called, not by where a release imports it from: releases move things (the kv-signal op is in
``fastdeploy.cache_manager.ops`` in one release and in ``fastdeploy.model_executor.ops.gpu`` in another).

* :data:`REGISTRY`: the names whose behaviour matters (the kv-signal op, the engine worker queue, IPC signals, the
  transfer managers, the logger, ``envs``, the speculative config), and :data:`SLICE_RANK_REGISTRY` what differs in a
  messager rank of an engine slice;
* a submodule the file imports (generated as a package of the tree) when the name is one;
* otherwise a permissive placeholder (:func:`placeholder`): a class that can be called, subclassed, read from and
  printed, false in a condition and zero in arithmetic. Each one is listed once in the rank's stderr, so that a run
  that fails because a release needs more than a placeholder says which name it was.
"""

import importlib
import os
import sys
import threading

#: name -> (module of this package, attribute): the stubs that do something.
REGISTRY = {
    "get_output_kv_signal": ("standin_ops", "get_output_kv_signal"),
    "get_logger": ("standin_utils", "get_logger"),
    "EngineWorkerQueue": ("engine", "EngineWorkerQueue"),
    "IPCSignal": ("engine", "IPCSignal"),
    "shared_memory_exists": ("engine", "shared_memory_exists"),
    "IPCCommManager": ("engine", "TransferManager"),
    "RDMACommManager": ("engine", "TransferManager"),
    "SpeculativeConfig": ("names", "SpeculativeConfig"),
    "ResourceManager": ("slice_prefill", "ResourceManager"),
}
#: In a messager rank of an engine slice (:mod:`.slice_rank`), the names that differ: its kv signals come from the
#: slice engine's scheduler.
SLICE_RANK_REGISTRY = {"get_output_kv_signal": ("slice_rank", "get_output_kv_signal")}

_placeholders = {}
_lock = threading.Lock()


class _PlaceholderType(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls()


class Permissive(metaclass=_PlaceholderType):
    """What an unknown name resolves to: accepts any call and attribute, and is falsy and zero."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Permissive()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Permissive()

    def __bool__(self):
        return False

    def __int__(self):
        return 0

    __index__ = __int__

    def __float__(self):
        return 0.0

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __repr__(self):
        return f"<preflight placeholder {type(self).__name__}>"


def placeholder(module_name, name):
    """The placeholder class for ``module_name.name`` (one per name, so that identity and subclassing hold)."""
    key = f"{module_name}.{name}"
    with _lock:
        if key not in _placeholders:
            _placeholders[key] = _PlaceholderType(name, (Permissive,), {"__module__": module_name})
            print(f"fastdeploy_pd_fix preflight: {key} is not stubbed, a placeholder stands in", file=sys.stderr)
        return _placeholders[key]


class Environment:
    """``fastdeploy.envs``: read on attribute access like upstream's. The v1 KV-cache scheduler is on (its messager is
    ``CacheMessagerV1``) and the engine queue is a TCP manager; any other switch is the environment's value, else 0
    (off)."""

    FORCED = {"ENABLE_V1_KVCACHE_SCHEDULER": 1, "FD_ENGINE_TASK_QUEUE_WITH_SHM": 0}
    DEFAULTS = {"FD_LOG_DIR": "log"}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self.FORCED:
            return self.FORCED[name]
        value = os.getenv(name, self.DEFAULTS.get(name, "0"))
        try:
            return int(value)
        except ValueError:
            return value


ENVS = Environment()


def _release_envs():
    """The release's own ``fastdeploy/envs.py`` where the tree holds it (an engine slice tree), else None."""
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "envs.py")):
        return None
    return importlib.import_module("fastdeploy.envs")


class SpeculativeConfig:
    """No speculative decoding: no extra cache layers."""

    def __init__(self, config=None, *args, **kwargs):
        self.config = dict(config or {}) if isinstance(config, dict) else {}
        self.method = None
        self.num_extra_cache_layer = 0
        self.num_gpu_block_expand_ratio = 0
        self.num_speculative_tokens = 0

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.config.get(name, 0)


def module_getattr(module_name, name):
    """``__getattr__`` of every generated module of the tree."""
    if name.startswith("__"):
        raise AttributeError(name)
    if module_name.rsplit(".", 1)[-1] == "envs":
        return getattr(ENVS, name)  # a stub envs module (the tree holds no release envs.py then)
    if name == "envs":
        return _release_envs() or ENVS
    if name in REGISTRY:
        module, attribute = REGISTRY[name]
        if name in SLICE_RANK_REGISTRY and importlib.import_module("fastdeploy._preflight.slice_rank").SLICE:
            module, attribute = SLICE_RANK_REGISTRY[name]
        return getattr(importlib.import_module(f"fastdeploy._preflight.{module}"), attribute)
    try:
        return importlib.import_module(f"{module_name}.{name}")  # a package of the tree the file also imports
    except ImportError:
        pass
    return placeholder(module_name, name)


def cpu_shim():
    """Map paddle's GPU-only device calls to the CPU (a CPU build raises on ``set_device("gpu:0")`` and on
    ``paddle.device.cuda.memory_allocated()``). Only the device is changed; tensors are real paddle tensors."""
    import paddle

    if paddle.is_compiled_with_cuda() or getattr(paddle, "_fd_pd_fix_preflight_shim", False):
        return
    original_set_device = paddle.set_device

    def set_device(device=None, *args, **kwargs):
        return original_set_device("cpu")

    paddle.set_device = set_device
    paddle.device.set_device = set_device
    cuda = getattr(paddle.device, "cuda", None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        if cuda is not None:
            setattr(cuda, name, lambda *args, **kwargs: 0)
    for name in ("empty_cache", "synchronize"):
        if cuda is not None:
            setattr(cuda, name, lambda *args, **kwargs: None)
    paddle._fd_pd_fix_preflight_shim = True
