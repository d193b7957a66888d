"""Models: the paper's parameter counts, and BatchNorm refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ModelError
from common.models import build_model, check_dp_compatible, num_parameters


@pytest.mark.parametrize(
    ("name", "dataset", "count"), [("mnist-cnn", "mnist", 26010), ("cifar-cnn", "cifar10", 550570)]
)
def test_paper_parameter_counts(name, dataset, count):
    assert num_parameters(build_model(name, dataset)) == count


@pytest.mark.parametrize(
    ("name", "dataset", "shape"),
    [
        ("mnist-cnn", "fashionmnist", (2, 1, 28, 28)),
        ("cifar-cnn", "cifar10", (2, 3, 32, 32)),
        ("resnet18-gn", "cifar10", (2, 3, 32, 32)),
        ("resnet18-gn", "mnist", (2, 1, 28, 28)),
    ],
)
def test_forward_shapes(name, dataset, shape):
    model = build_model(name, dataset)
    assert model(torch.randn(*shape)).shape == (2, 10)


def test_resnet_has_groupnorm_and_no_batchnorm():
    model = build_model("resnet18-gn", "cifar10")
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_batchnorm_refused_with_layer_name():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ModelError, match="'1' is BatchNorm2d"):
        check_dp_compatible(model)


def test_wrong_input_shape_refused():
    with pytest.raises(ModelError, match="needs 1x28x28"):
        build_model("mnist-cnn", "cifar10")


@pytest.mark.parametrize("shape", [(8, 16, 14, 14), (3, 2, 6, 7)])
@pytest.mark.parametrize("ties", [False, True])
def test_channels_last_max_pool_is_bit_identical_to_max_pool2d(shape, ties):
    """The MNIST CNN's pooling layer: same values and same gradients as nn.MaxPool2d(2, 1),
    ties included (they decide which input gets the gradient)."""
    from common.models import MaxPool2dStride1

    torch.manual_seed(0)
    x = torch.randint(0, 3, shape).float() if ties else torch.randn(shape)
    g = torch.randint(-3, 4, (shape[0], shape[1], shape[2] - 1, shape[3] - 1)).float()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = torch.nn.MaxPool2d(2, 1)(a), MaxPool2dStride1(2)(b)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert yb.is_contiguous()
