"""Fixtures for the fake API server tests: official clients bound to the running server.

The server fixture itself (``apiserver``, in tests/conftest.py, shared with the sources'
tests) disables periodic bookmarks so event sequences are deterministic (tests
that want them build their own server), and fails the test if the fake itself crashed while
handling a request — a 500 from the fake is a bug in the test infrastructure, not the client.
"""

from __future__ import annotations

from collections.abc import Iterator

import kubernetes.client
import pytest

from .server import FakeApiServer


@pytest.fixture
def api_client(apiserver: FakeApiServer) -> Iterator[kubernetes.client.ApiClient]:
    """An official ApiClient pointing at the fake server, closed afterwards."""
    with apiserver.api_client() as client:
        yield client


@pytest.fixture
def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    """CoreV1Api (Services, Nodes) over the fake server."""
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def discovery(api_client: kubernetes.client.ApiClient) -> kubernetes.client.DiscoveryV1Api:
    """DiscoveryV1Api (EndpointSlices) over the fake server."""
    return kubernetes.client.DiscoveryV1Api(api_client)
