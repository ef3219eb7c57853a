import os
from pathlib import Path

import pytest
import torch

import tasa_ext

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TASA_SHARED_DATA", REPO.parent / "shared" / "data"))


def cpu_isas():
    """Every CPU instruction-set path this machine can run (each must match the reference)."""
    return tasa_ext.ops.cpu_isas_available()


@pytest.fixture(params=cpu_isas())
def isa(request):
    tasa_ext.set_cpu_isa(request.param)
    yield request.param
    tasa_ext.set_cpu_isa("auto")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data folder {SHARED_DATA} is missing (set TASA_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
