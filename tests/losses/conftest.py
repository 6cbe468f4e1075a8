import pytest

from tests.losses.cases import ALL_CASES


@pytest.fixture(params=ALL_CASES)
def loss_case(request):
    return request.param
