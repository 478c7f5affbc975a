import pytest

from fastpunch._netns import VethPair
from tests.conftest import require_root


@pytest.fixture
def veth():
    """Two fresh namespaces joined by a veth pair (198.51.100.1 <-> .2),
    removed after the test whatever its outcome."""
    require_root("a live engine test")
    with VethPair() as pair:
        yield pair
