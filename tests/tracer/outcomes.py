"""How the tracer tests read a trace's outcome: its endpoint shares and its path."""

from __future__ import annotations

from iptsync.core.names import is_service_chain
from iptsync.inspection.trace import TraceResult


def shares(result: TraceResult) -> dict[str, float]:
    """Endpoints with their probabilities rounded, for exact comparison."""
    return {endpoint: round(p, 6) for endpoint, p in result.endpoints.items()}


def chains(result: TraceResult) -> list[str]:
    """The chains of the most likely outcome's path, without the service hashes."""
    return [step.chain.rsplit("-", 1)[0] if is_service_chain(step.chain) else step.chain
            for step in result.most_likely.path]
