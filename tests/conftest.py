import pytest
import torch

import tasa_ext

from helpers import SHARED_DATA, SHARED_DATA_MISSING


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
    """The full data folder (../shared/data or $TASA_SHARED_DATA); the test is skipped, with the
    path and the variable named, where it is missing. Tests that need only a little data use
    the slices shipped in tasa/data instead (helpers.shipped_data_folder)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_DATA_MISSING)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
