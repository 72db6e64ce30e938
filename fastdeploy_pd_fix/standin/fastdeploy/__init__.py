"""Stand-in for the FastDeploy package: only what the prefill-side cache messager touches.

Kept light on purpose: upstream's ``fastdeploy/__init__.py`` pulls the whole engine, this one imports nothing.
"""

__version__ = "2.6.0.standin"
STANDIN = True
