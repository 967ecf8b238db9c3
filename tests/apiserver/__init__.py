"""A fake kube-apiserver speaking the real list/watch protocol over HTTP, for agent tests.

Use :class:`FakeApiServer` as a context manager; point the official ``kubernetes`` client at
it with :meth:`FakeApiServer.client_configuration`, :meth:`FakeApiServer.api_client` or
:meth:`FakeApiServer.write_kubeconfig`. See ``server.py`` for the protocol it enforces.
"""

from .server import FakeApiServer, RecordedRequest, manifest
from .store import ConflictError

__all__ = ["ConflictError", "FakeApiServer", "RecordedRequest", "manifest"]
