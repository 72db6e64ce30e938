"""fastdeploy-pd-fix: a rank-invariant layer-0 release for FastDeploy's prefill-side cache messager.

Installed beside FastDeploy, ``fastdeploy_pd_fix.pth`` patches ``CacheMessagerV1`` in every process that builds it
(see :mod:`fastdeploy_pd_fix.plugin` for what is patched in which process). ``FD_PD_FIX=0`` switches it off.
"""

__version__ = "0.1.0"
