"""Operator and developer tools: demo, preflight, diagnose, stress, the engine slice."""
