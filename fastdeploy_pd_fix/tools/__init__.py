"""Operator tools built on the plugin: the stand-in demo, offline log diagnosis and the stress driver."""
