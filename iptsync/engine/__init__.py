"""One node's rules kept in line with the cluster: ``reconciler`` (the per-service render cache
and its partial and full syncs through the kernel port), ``apply`` (a plan into the kernel:
staged, atomic, undone on failure), ``progress`` (long syncs logged), ``desired`` (the same
assembly for ``dump``, ``diff``, ``trace`` and ``explain``).
"""
