"""Tests of the packet tracer (iptsync.inspection.trace)."""
