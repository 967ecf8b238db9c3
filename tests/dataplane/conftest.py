"""The namespace lab fixture of ``test_traffic``, shared with the other data-plane modules."""

from __future__ import annotations

from .test_traffic import lab

__all__ = ["lab"]
