"""``fastdeploy-pd-fix verify``: an exhaustive interleaving explorer over the release policies (see command.py)."""
