"""A barrier of the messager's queue to the engine as one of the messager's threads sees it (in the preflight tree:
``fastdeploy._preflight.barriers``), for the stubs that act right after it: the preflight tap after
``begin_send_cache_barrier`` (:mod:`.engine`), a slice rank after ``cache_info_barrier`` (:mod:`.slice_rank`).
"""


class HookedBarrier:
    """The real barrier, then ``after()`` in the thread that waited; anything else is the real barrier's."""

    def __init__(self, barrier, after):
        self._barrier = barrier
        self._after = after

    def wait(self, *args, **kwargs):
        result = self._barrier.wait(*args, **kwargs)
        self._after()
        return result

    def __getattr__(self, name):
        return getattr(self._barrier, name)
