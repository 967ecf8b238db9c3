"""Tests of the packet tracer (iptsync.trace)."""
