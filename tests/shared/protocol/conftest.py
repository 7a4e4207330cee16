"""Fixtures for the protocol tests; the helpers live in protocol_pairs.py."""

from __future__ import annotations

import pytest
from protocol_pairs import Pair, make_pair


@pytest.fixture
def pair() -> Pair:
    """An authenticated relay and agent, back to back."""
    return make_pair()
