"""One module per enforcement mechanism, each a pure translation of a policy plus a thin runner."""
