import sys

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


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real entry point (as the installed `diffaccel` script does): exit code, stdout, stderr."""
    from diffaccel.cli import main

    monkeypatch.setattr(sys, "argv", ["diffaccel", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
