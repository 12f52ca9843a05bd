import pytest
from trainer_support import tiny_model

from kvpo.generators.model import TinyARVideo
from kvpo.run.checkpoint import save_model


@pytest.fixture
def model() -> TinyARVideo:
    return tiny_model()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A checkpoint of the tiny generator, for training runs."""
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    save_model(tiny_model(), path)
    return str(path)
