"""Stand-in only (no upstream counterpart): release-variant selection and the scripted event streams."""
