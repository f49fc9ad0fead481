"""Galleries: build, add, remove and reproject; encoding, indexing, the raw store, engines."""
