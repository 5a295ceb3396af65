"""Every registry entry: published parameter counts, forward passes, gradients (timm-style)."""

import pytest
import torch

from cnnserve import models
from cnnserve.models.registry import register_model
from cnnserve.models.summary import summarize_arch
from tests.conftest import run_cli

ALL = models.list_models()

PUBLISHED = {  # 3x224x224, 1000 classes (LeNet: 1x32x32, 10 classes)
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "alexnet": 61_100_840,
    "googlenet": 6_624_904, "densenet121": 7_978_856, "mobilenet_v1": 4_231_976,
}


def test_registry_holds_every_required_family():
    required = {"lenet5", "lenet5_classic", "alexnet", "zfnet", "googlenet", "resnet18", "resnet34", "resnet50",
                "densenet121", "mobilenet_v1"} | {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    assert required <= set(ALL)


@pytest.mark.parametrize("name, count", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, count):
    with torch.device("meta"):
        model = models.create_model(name, num_classes=1000, in_chans=3, img_size=224)
    assert sum(p.numel() for p in model.parameters()) == count


def test_classic_lenet5_parameter_count():
    model = models.create_model("lenet5_classic", num_classes=10, in_chans=1, img_size=32)
    assert sum(p.numel() for p in model.parameters()) == 61_706
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in model.modules())


@pytest.mark.parametrize("name", ALL)
def test_forward_at_spec_size(name):
    spec = models.default_spec(name)
    model = models.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", ALL)
def test_small_inputs_and_gradients(name, size):
    """Small inputs work for every family, with 1 or 3 channels, and every parameter gets a gradient."""
    in_chans = 1 if size == 28 else 3
    model = models.create_model(name, num_classes=5, in_chans=in_chans, img_size=size).train()
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_googlenet_aux_heads_train_only():
    model = models.create_model("googlenet", num_classes=4, in_chans=3, img_size=64, aux_logits=True)
    x = torch.randn(2, 3, 64, 64)
    main, aux1, aux2 = model.train()(x)
    assert main.shape == aux1.shape == aux2.shape == (2, 4)
    assert model.eval()(x).shape == (2, 4)  # eval and export see the main head only


def test_lenet5_summary_table_shapes():
    s = summarize_arch("lenet5", num_classes=10)
    shapes = []
    for layer in s.layers:
        if not shapes or shapes[-1] != layer.output:
            shapes.append(layer.output)
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,), (84,), (10,)]
    assert s.params == 61_706
    assert s.macs == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10


def test_resnet18_macs_match_published():
    assert round(summarize_arch("resnet18").macs / 1e9, 2) == 1.81


def test_unknown_and_duplicate_names():
    with pytest.raises(models.UnknownModelError, match="valid names: alexnet"):
        models.create_model("resnet9000", num_classes=2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18", family="resnet")(lambda **kw: None)


def test_models_cli_lists_and_summarises():
    out = run_cli("models", check=True).stdout
    assert "resnet50" in out and "25,557,032" in out and "3x224x224" in out
    table = run_cli("models", "lenet5", "--summary", check=True).stdout
    for shape in ("6x28x28", "6x14x14", "16x10x10", "16x5x5", "120", "84", "10"):
        assert shape in table
    assert "total params: 61,706" in table
    bad = run_cli("models", "nope")
    assert bad.returncode == 2 and "valid names" in bad.stderr and "Traceback" not in bad.stderr
