import pytest


@pytest.fixture(autouse=True)
def _world(megatron_world):
    yield
