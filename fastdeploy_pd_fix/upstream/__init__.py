"""``fastdeploy-pd-fix make-patch``: the fix as a commit in a FastDeploy checkout, and as ``git format-patch`` files.

* :mod:`.generate`: the portable part, new files only: :mod:`fastdeploy_pd_fix.policy` and
  :mod:`fastdeploy_pd_fix.adapters` copied verbatim as the subpackages of ``fastdeploy/cache_manager/layer0_release/``,
  and its CPU unit test (``templates/test_layer0_release.py``).
* :mod:`.rewrite`: the branch-specific part, ``cache_messager.py`` with ``consume_signals`` replaced and one line
  added to ``_add_cache_task_thread``; both call the copied package, as the plugin calls
  :mod:`fastdeploy_pd_fix.adapters`.
* :mod:`.rewrite_engine`: the engine side, where recognised: the slot-lifecycle notices put by ``ResourceManagerV1``
  into the mailbox ``SplitwiseConnector`` gives it, as the plugin's engine-side patch does at run time.
* :mod:`.message`: titles and commit messages in FastDeploy's PR template (``templates/*.md``).
* :mod:`.git`: the git plumbing; :mod:`.command`: ``make_patch``, ``portable_patch`` and the command line.
"""

from fastdeploy_pd_fix.target import SCRIPT_PATH, UPSTREAMED_PACKAGE, UPSTREAMED_PATH

#: The file of each branch that the branch-specific part edits.
TARGET_PATH = SCRIPT_PATH
#: The package the portable part adds (verbatim copies of fastdeploy_pd_fix/policy/ and adapters/).
PACKAGE_PATH = UPSTREAMED_PATH
#: Its CPU unit test in FastDeploy's tests/ tree.
TEST_PATH = f"tests/cache_manager/test_{UPSTREAMED_PACKAGE}.py"


class MakePatchError(Exception):
    """A refusal: the message says why, and nothing was changed."""
