"""Where Kubernetes objects come from: manifest files (``--objects``) or the API server.

Only this package talks to the outside world for objects; everything downstream sees parsed
:mod:`iptsync.core.model` values.
"""
