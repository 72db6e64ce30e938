"""Facts about what the plugin patches: where FastDeploy's cache messager lives and what we rely on in it.

Names only, no imports: the start-up hook reads :data:`SCRIPT_PATH` in every interpreter. The syntax-tree checks
built on these facts are in :mod:`fastdeploy_pd_fix.analysis`.
"""

#: The file FastDeploy runs as a script, one process per tensor-parallel rank (its classes then live in __main__).
SCRIPT_PATH = "fastdeploy/cache_manager/cache_messager.py"
#: The same file imported as a module (upstream's unit tests, tools).
TARGET_MODULE = "fastdeploy.cache_manager.cache_messager"
TARGET_CLASS = "CacheMessagerV1"
#: The two methods we replace or wrap.
PATCHED_METHODS = ("consume_signals", "_add_cache_task_thread")
#: ``self.<name>`` attributes the patched methods read or write; a class without one of them is not recognised.
USED_ATTRIBUTES = (
    "engine_cache_task_thread_lock",
    "engine_cache_tasks",
    "idx_cache_task_dict",
    "cache_prefilled_engine_ids_queue",
)
#: The custom op ``consume_signals`` reads kv signals with.
KV_SIGNAL_OP = "get_output_kv_signal"
#: The package ``make-patch`` adds to FastDeploy (a copy of :mod:`fastdeploy_pd_fix.core`); a release that uses it
#: already carries the fix.
UPSTREAMED_PACKAGE = "layer0_release"
#: ``fastdeploy/cache_manager/`` path of that package.
UPSTREAMED_PATH = f"fastdeploy/cache_manager/{UPSTREAMED_PACKAGE}"
#: Buffer of early layer-0 signals that releases from #7872 on create in ``__init__``.
PENDING_BUFFER = "pending_layer0_signals"
#: The registration barrier and report that #7724 removed from ``_add_cache_task_thread`` in some releases.
FINISH_ADD_BARRIER = "finish_add_cache_task_barrier"
