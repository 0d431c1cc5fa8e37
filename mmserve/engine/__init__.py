"""The colocated engine: one process runs encode, prefill and decode with continuous batching."""
