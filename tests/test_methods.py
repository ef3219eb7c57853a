"""The method registry (issue 24): a new quantization method is one class with
@register_method; the API, the driver, the lazy job and the command line then know it."""
import pytest
import torch

import tasa
from tasa import cli
from tasa.layers import quantized_modules
from tasa.quant import METHODS, Method, get_method, quantize_rtn, register_method

from helpers import tiny_llama


@pytest.fixture
def halfscale():
    """A toy data-free method: RTN whose scales are then halved (a different, checkable result)."""

    @register_method
    class HalfScale(Method):
        name = "test-halfscale"
        needs_hessian = False
        description = "RTN with halved scales (a test method)"

        def quantize(self, W, spec, H=None, *, damp=0.01, name="weight"):
            q = quantize_rtn(W, spec, name=name)
            q.scales = (q.scales.float() / 2).half()
            return q

    yield HalfScale
    METHODS.pop("test-halfscale", None)


def test_registry_lists_and_refuses():
    assert {"rtn", "gptq"} <= set(METHODS)
    assert get_method("gptq").needs_hessian and not get_method("rtn").needs_hessian
    with pytest.raises(ValueError, match="unknown quantization method 'nope'"):
        get_method("nope")

    class Other(Method):
        name = "rtn"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)


def test_a_registered_method_runs_everywhere(halfscale, tmp_path):
    torch.manual_seed(0)
    ref = tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)
    torch.manual_seed(0)
    new = tasa.quantize(tiny_llama(), None, bits=4, method="test-halfscale", group_size=32,
                        progress=False, out=tmp_path / "o")
    name = "model.layers.0.mlp.up_proj"
    a, b = quantized_modules(ref)[name], quantized_modules(new)[name]
    assert torch.equal(a.qweight, b.qweight)
    torch.testing.assert_close(b.scales.float(), a.scales.float() / 2, rtol=1e-3, atol=0)
    assert tasa.load(tmp_path / "o").config.quantization_config.meta["method"] == "test-halfscale"
    # the command line offers it
    args = cli.build_parser().parse_args(["quantize", "--out", "x", "--method", "test-halfscale"])
    assert args.method == "test-halfscale"
