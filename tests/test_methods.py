"""qgoft.methods, the one table of methods, adapter parameters and adapter dtypes: what qgoft.nn.Linear creates,
QGoftConfig accepts and save_pretrained writes all follow it."""

import pytest
import torch

import qgoft
from qgoft import methods


@pytest.mark.parametrize("method", methods.METHODS)
@pytest.mark.parametrize("d", [2, 7, 16])
def test_linear_creates_the_parameters_of_the_table(method, d):
    layer = qgoft.nn.Linear(d, 3, method=method, adapter_dtype=torch.float64)
    created = {name: list(getattr(layer, name).shape) for name in methods.PARAMETER_NAMES
               if getattr(layer, name) is not None}
    assert created == methods.parameter_shapes(method, layer.layout.num_pairs, d)
    assert list(created) == list(methods.METHOD_PARAMETERS[method])
    assert all(p.dtype == torch.float64 for p in layer.adapter_parameters())


def test_one_list_of_methods_and_dtypes():
    assert qgoft.nn.METHODS is methods.METHODS
    assert set(methods.PARAMETER_NAMES) == {n for names in methods.METHOD_PARAMETERS.values() for n in names}
    for name, dtype in methods.ADAPTER_DTYPES.items():
        assert qgoft.QGoftConfig(target_modules=["x"], adapter_dtype=name).torch_adapter_dtype == dtype
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        methods.check_method("lora")
    with pytest.raises(ValueError, match="adapter_dtype"):
        qgoft.nn.Linear(4, 4, adapter_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown method"):
        methods.parameter_shapes("qgoft_scaled", 3, 4)  # an op variant, not a layer method
