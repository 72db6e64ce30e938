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
#: The package ``make-patch`` adds to FastDeploy (copies of :mod:`fastdeploy_pd_fix.policy` and
#: :mod:`fastdeploy_pd_fix.adapters`); a release that uses it already carries the fix.
UPSTREAMED_PACKAGE = "layer0_release"
#: ``fastdeploy/cache_manager/`` path of that package.
UPSTREAMED_PATH = f"fastdeploy/cache_manager/{UPSTREAMED_PACKAGE}"
#: Buffer of early layer-0 signals that releases from #7872 on create in ``__init__``.
PENDING_BUFFER = "pending_layer0_signals"
#: The registration barrier and report that #7724 removed from ``_add_cache_task_thread`` in some releases.
FINISH_ADD_BARRIER = "finish_add_cache_task_barrier"

# The engine side (release rules R8 and R9): the engine process puts slot-lifecycle notices into the cache-info
# mailbox. FastDeploy's names as read in its code (docs/design/slot-lifecycle.md section 7); what is confirmed and
# what is not is in fastdeploy_pd_fix/plugin/engine/patch.py.

#: The scheduler that frees an aborted request's slot and admits prefill requests (ENABLE_V1_KVCACHE_SCHEDULER).
RESOURCE_MANAGER_MODULE = "fastdeploy.engine.sched.resource_manager_v1"
RESOURCE_MANAGER_CLASS = "ResourceManagerV1"
#: The wrapped methods and the leading parameters each must have.
RESOURCE_MANAGER_METHODS = {
    "recycle_abort_task": ("self", "request_id"),
    "add_request_in_p": ("self", "requests"),
}
#: The connector that puts P-parts into the cache-info mailbox; the only engine object that holds the mailbox and
#: the resource manager together (``__init__`` stores both).
CONNECTOR_MODULE = "fastdeploy.splitwise.splitwise_connector"
CONNECTOR_CLASS = "SplitwiseConnector"
CONNECTOR_METHODS = {"__init__": ("self",)}
#: ``SplitwiseConnector`` attributes: the engine's ``EngineWorkerQueue`` client and the resource manager.
CONNECTOR_MAILBOX = "engine_worker_queue"
CONNECTOR_RESOURCE_MANAGER = "resource_manager"
#: The mailbox call: one batch at a time, a put waits until every messager rank has read the previous batch.
MAILBOX_PUT = "put_cache_info"
#: The engine modules the start-up hook patches after import.
ENGINE_MODULES = (RESOURCE_MANAGER_MODULE, CONNECTOR_MODULE)
