"""The audit trail: events from every layer, and the sinks that keep them."""
