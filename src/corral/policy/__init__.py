"""The policy: immutable data, presets, settings, and path and domain matching (no backends)."""
