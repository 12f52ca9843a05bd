import pytest
from trainer_support import tiny_model

from kvpo.model import TinyARVideo


@pytest.fixture
def model() -> TinyARVideo:
    return tiny_model()
