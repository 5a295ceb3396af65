"""`cnnserve export ARCH --weights FILE` says the model's input: the size, normalisation and resize the
library's own data config gives, or the flags (which override it); the spec carries them into the ONNX file
and the service preprocesses by them. Its int8 variant calibrates on real images only (`--calib-images`),
and the agreement gate runs on images of that folder that calibration did not see. Tiny architectures
(timm's test_resnet, torchvision's shufflenet_v2_x0_5) at 128 px, so each test stays short."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnserve.core.preprocess import preprocess
from cnnserve.core.runtime import load_model
from cnnserve.export.files import ExportError
from cnnserve.export.pipeline import export_checkpoint
from cnnserve.export.store import read_info
from cnnserve.models.pretrained import import_torchvision, library_data_config
from tests.conftest import encode, run_cli
from tests.test_byo import randomise_bn

tv = import_torchvision()
LABELS = ("circle", "square", "triangle", "cross")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Local random weights of two tiny library architectures with four classes, their label file, and a
    folder of 48 pictures (drawn shapes, JPEG, not square) to calibrate and check int8 on."""
    import timm
    from safetensors.torch import save_file

    from cnnserve.models.data import render_shape

    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    nets = {"timm": randomise_bn(timm.create_model("test_resnet", num_classes=len(LABELS))).eval(),
            "tv": randomise_bn(tv.models.shufflenet_v2_x0_5(num_classes=len(LABELS))).eval()}
    save_file(nets["timm"].state_dict(), str(d / "timm.safetensors"))
    torch.save(nets["tv"].state_dict(), d / "tv.pth")
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    photos = d / "photos"
    rng = np.random.default_rng(0)
    for i in range(48):
        kind = LABELS[i % len(LABELS)]
        (photos / kind).mkdir(parents=True, exist_ok=True)
        img = render_shape(kind, rng, 200).crop((0, 20, 200, 170))  # 200x150: resized as the spec says
        (photos / kind / f"{i:02d}.jpg").write_bytes(encode(np.asarray(img), "JPEG"))
    return {"dir": d, "nets": nets, "photos": photos}


def eager(net, pixels: np.ndarray, mean, std) -> np.ndarray:
    """The library network in PyTorch on uint8 pixels, normalised here by hand."""
    x = torch.from_numpy(pixels).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return net(x).numpy()


def check_served_input(path, net, size, mean, std, photo):
    """The file's spec says the input, and a picture preprocessed by the service's own code for that spec
    gets the library network's answer on the same normalisation."""
    model = load_model(path, providers="cpu", warm_up=False)
    spec = model.spec
    assert (spec.channels, spec.height, spec.width) == (3, size, size)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    assert read_info(path).spec == spec  # what the metadata holds is what runtime loads
    pixels = preprocess(photo.read_bytes(), spec)[None]
    assert pixels.shape == (1, 3, size, size)
    logits, _ = model.run(pixels, ["logits", "probabilities"])
    np.testing.assert_allclose(logits, eager(net, pixels, mean, std), atol=1e-3)
    return spec


def test_timm_export_takes_the_library_data_config_at_the_size_asked(weights, tmp_path):
    """timm's test_resnet: mean and std 0.5 and crop 0.95 from its pretrained_cfg (not ImageNet's), at 128 px
    from --img-size (its config says 160)."""
    d = weights["dir"]
    out = tmp_path / "timm" / "model.onnx"
    proc = run_cli("export", "timm:test_resnet", "--weights", d / "timm.safetensors", "--labels", d / "labels.txt",
                   "--img-size", 128, "--out", out, check=True)
    assert "input 3x128x128" in proc.stdout, proc.stdout
    spec = check_served_input(out, weights["nets"]["timm"], 128, (0.5,) * 3, (0.5,) * 3,
                              weights["photos"] / "circle" / "00.jpg")
    assert spec.resize == "center-crop" and spec.crop_pct == pytest.approx(0.95)
    assert spec.labels == LABELS


def test_torchvision_export_flags_override_the_library(weights, tmp_path):
    """torchvision's shufflenet: --mean/--std/--resize given on the command line win over the weights'
    transforms (ImageNet's); --resize whole keeps the whole picture (the spec's stretch)."""
    d = weights["dir"]
    out = tmp_path / "tv" / "model.onnx"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    run_cli("export", "torchvision:shufflenet_v2_x0_5", "--weights", d / "tv.pth", "--labels", d / "labels.txt",
            "--img-size", 128, "--mean", *mean, "--std", *std, "--resize", "whole", "--out", out, check=True)
    spec = check_served_input(out, weights["nets"]["tv"], 128, mean, std, weights["photos"] / "square" / "01.jpg")
    assert spec.resize == "stretch"


def test_library_data_config_by_preset():
    """A preset names the library's own weights whose transform to take (torchvision's enum member, timm's
    pretrained tag); an unknown one is refused with the ones there are."""
    default = library_data_config("torchvision:regnet_x_400mf")
    v1 = library_data_config("torchvision:regnet_x_400mf", "IMAGENET1K_V1")
    assert default["crop_pct"] == pytest.approx(224 / 232) and v1["crop_pct"] == pytest.approx(224 / 256)
    assert default["mean"] == pytest.approx((0.485, 0.456, 0.406)) and default["size"] == 224
    with pytest.raises(LookupError, match="IMAGENET1K_V2"):
        library_data_config("torchvision:regnet_x_400mf", "IMAGENET9K")
    timm_cfg = library_data_config("timm:test_resnet")
    assert timm_cfg["mean"] == pytest.approx((0.5,) * 3) and timm_cfg["size"] == 160
    assert timm_cfg["interpolation"] == "bilinear" and timm_cfg["crop_pct"] == pytest.approx(0.95)


def test_int8_without_real_images_is_refused_naming_the_flag(weights, tmp_path):
    """Weights come with no data set: int8 calibrated on random pixels would pass its gate trivially, so
    --int8 without --calib-images is refused before anything is written."""
    d = weights["dir"]
    out = tmp_path / "x" / "model.onnx"
    proc = run_cli("export", "timm:test_resnet", "--weights", d / "timm.safetensors", "--labels", d / "labels.txt",
                   "--img-size", 128, "--int8", "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--calib-images" in proc.stderr, proc.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_int8_api_refuses_a_checkpoint_without_data(weights, tmp_path):
    from cnnserve.models.fromweights import checkpoint_from_weights

    d = weights["dir"]
    ckpt = checkpoint_from_weights("timm:test_resnet", d / "timm.safetensors", tmp_path / "model.pt",
                                   d / "labels.txt", input={"size": 128})
    with pytest.raises(ExportError, match="calib-images"):
        export_checkpoint(ckpt, int8=True, log=lambda *a: None)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_int8_calibrates_on_the_folder_and_gates_on_held_out_images(weights, tmp_path):
    """--calib-images DIR: --calibration of its pictures calibrate, the others (never seen by calibration)
    choose the method and run the agreement gate; the report says which and how many."""
    d = weights["dir"]
    out = tmp_path / "q" / "model.onnx"
    proc = run_cli("export", "timm:test_resnet", "--weights", d / "timm.safetensors", "--labels", d / "labels.txt",
                   "--img-size", 128, "--int8", "--calib-images", weights["photos"], "--calibration", 16,
                   "--out", out)
    report = json.loads((out.parent / "model.int8.verify.json").read_text())
    cal = report["calibration"]
    assert str(weights["photos"]) in cal["source"] and cal["images"] == 16
    assert report["n_images"] == 48 - 16 and cal["selection_images"] == 48 - 16
    assert set(cal["files"]).isdisjoint(cal["held_out_files"]) and len(cal["held_out_files"]) == 32
    assert "random" not in proc.stdout
    assert proc.returncode == 0 and report["passed"], proc.stdout + proc.stderr
    int8 = load_model(out, providers="cpu", precision="int8", warm_up=False)
    assert int8.info.precision == "int8" and int8.spec.height == 128
