import pytest

from foe_compile import builtin_model
from foe_compile.builtin import TINY


@pytest.fixture(params=TINY)
def family_name(request) -> str:
    return request.param


@pytest.fixture
def source(family_name):
    return builtin_model(family_name, seed=0)
