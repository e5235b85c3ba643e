import pytest
import torch

from diffaccel.zoo.weights import WEIGHTS_DIR


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)
    yield


requires_weights = pytest.mark.skipif(
    not (WEIGHTS_DIR / "dit" / "transformer" / "config.json").exists(),
    reason="shipped weights are not in the package",
)
