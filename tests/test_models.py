import pytest
import torch

from kdcli.core.errors import KdError
from kdcli.models import build_model, count_flops, count_params


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def linear(i, o):
    return i * o + o


def test_parameter_counts_match_the_architectures():
    # convnet on 28x28: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so fc1 sees 20*4*4.
    assert count_params(build_model("convnet", (1, 28, 28), 10)) == conv(1, 10, 5) + conv(10, 20, 5) + linear(
        320, 50
    ) + linear(50, 10)
    # lenet5: conv1 pads by 2 (28 stays 28) -pool-> 14 -conv5-> 10 -pool-> 5.
    assert count_params(build_model("lenet5", (1, 28, 28), 10)) == (
        conv(1, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, 10)
    )
    assert count_params(build_model("mlp", (1, 28, 28), 10, {"hidden": [64, 32]})) == linear(784, 64) + linear(
        64, 32
    ) + linear(32, 10)


@pytest.mark.parametrize("name", ["mlp", "convnet", "lenet5"])
@pytest.mark.parametrize("shape,classes", [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 20, 24), 2)])
def test_models_adapt_to_input_shape_and_class_count(name, shape, classes):
    model = build_model(name, shape, classes)
    assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(KdError, match="convnet' needs larger inputs than 8x8"):
        build_model("convnet", (1, 8, 8), 10)


def test_flops_of_an_mlp_are_two_per_multiply_add():
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [32]})
    assert count_flops(model, (1, 28, 28)) == 2 * (784 * 32 + 32 * 10)
