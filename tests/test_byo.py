"""Bring your own model: torchvision/timm weights into the zoo, fine-tuning, library architectures
by name, and any ONNX classifier imported. No downloads: every weights file is made here."""

import json
import shlex

import httpx
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cnnserve import models
from cnnserve.models.checkpoint import load_checkpoint
from cnnserve.models.pretrained import WeightsError, import_torchvision, load_weights, read_weights
from cnnserve.models.train import TrainConfig, train
from cnnserve.core.runtime import load_model
from tests.conftest import Server, encode, run_cli

tv = import_torchvision()


def randomise_bn(net):
    """Batch-norm statistics other than (0, 1), so a wrong mapping of them shows in the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


FAMILIES = {  # zoo name: the same architecture built by torchvision (timm for MobileNet v1)
    "resnet18": lambda: tv.models.resnet18(),
    "resnet50": lambda: tv.models.resnet50(),
    "vgg11": lambda: tv.models.vgg11(),
    "vgg11_bn": lambda: tv.models.vgg11_bn(),
    "alexnet": lambda: tv.models.alexnet(),
    "googlenet": lambda: tv.models.googlenet(aux_logits=True, init_weights=True),  # aux heads are skipped
    "densenet121": lambda: tv.models.densenet121(),
    "mobilenet_v1": lambda: __import__("timm").create_model("mobilenetv1_100"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_library_state_dicts_load_into_every_zoo_family(name, tmp_path):
    torch.manual_seed(0)
    ref = randomise_bn(FAMILIES[name]()).eval()
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    zoo = models.create_model(name, num_classes=1000, in_chans=3, img_size=224).eval()

    state, spec = read_weights(tmp_path / "weights.pth")
    result = load_weights(zoo, state, "weights.pth")
    assert spec is None and result["head"] == "loaded"
    # AlexNet and VGG size their classifier from the input (224, as torchvision's); the others pool
    side = 224 if name.startswith(("alexnet", "vgg")) else 64
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want, got = ref(x), zoo(x)
    want = want[0] if isinstance(want, tuple) else want
    assert float((want - got).abs().max()) <= 1e-5


def test_weights_that_do_not_fit_name_missing_and_unexpected_keys(tmp_path):
    zoo = models.create_model("resnet18", num_classes=1000, in_chans=3, img_size=224)
    with pytest.raises(WeightsError) as e:
        load_weights(zoo, tv.models.resnet34().state_dict(), "r34.pth")
    msg = str(e.value)
    assert "r34.pth" in msg and "missing: none" in msg and "unexpected: layer" in msg
    with pytest.raises(WeightsError, match=r"shapes do not fit: .*stem\.0\.weight .*<- conv1\.weight"):
        load_weights(models.create_model("resnet18", num_classes=10, in_chans=1, img_size=224),
                     tv.models.resnet18().state_dict(), "r18.pth")
    # on the command line: one line, no traceback
    torch.save(tv.models.resnet34().state_dict(), tmp_path / "r34.pth")
    proc = run_cli("train", "resnet18", "--data", "digits", "--img-size", "32", "--pretrained", tmp_path / "r34.pth",
                   "--epochs", "1", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing:" in proc.stderr and "unexpected:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def shapes_run(shapes_resnet_run):
    return shapes_resnet_run


def fine_tune(tmp_path, run, **kw):
    cfg = TrainConfig(arch="resnet18", data="digits", pretrained=str(run / "model.pt"), limit=64, epochs=1,
                      patience=0, optimizer="sgd", out=str(tmp_path / "ft"), **kw)
    return load_checkpoint(train(cfg, progress=False) / "model.pt")


def backbone(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_fine_tuning_replaces_the_head_and_starts_from_the_weights(shapes_run, tmp_path):
    source = load_checkpoint(shapes_run / "model.pt")
    # backbone learning rate 0: after an epoch its weights are still exactly the loaded ones
    still = fine_tune(tmp_path / "a", shapes_run, backbone_lr=0.0)
    assert still["origin"]["kind"] == "pretrained" and still["origin"]["head"] == "replaced"
    assert still["state_dict"]["head.2.weight"].shape == (10, 512) and source["spec"].num_classes == 4
    # the spec keeps the weights' input (3 x 32 x 32) and normalisation, not the digits' statistics
    assert still["spec"].channels == 3 and still["spec"].height == 32
    assert still["spec"].mean == source["spec"].mean and still["spec"].std == source["spec"].std
    for k, v in backbone(source["state_dict"]).items():
        if k.endswith("weight") and v.ndim == 4:  # convolutions (BN statistics move in train mode)
            assert torch.equal(still["state_dict"][k], v), k
    # frozen: every backbone tensor, batch-norm statistics included, stays as loaded
    frozen = fine_tune(tmp_path / "c", shapes_run, freeze_backbone=True)
    for k, v in backbone(source["state_dict"]).items():
        assert torch.equal(frozen["state_dict"][k], v), k
    assert not torch.equal(frozen["state_dict"]["head.2.bias"], torch.zeros(10))  # the head learned
    # resumed, a fine-tuned run keeps its input size and its origin (the weights file is not read again)
    cfg = TrainConfig(arch="resnet18", data="digits", pretrained=str(shapes_run / "model.pt"), limit=64, epochs=2,
                      patience=0, optimizer="sgd", freeze_backbone=True, out=str(tmp_path / "c" / "ft"))
    resumed = load_checkpoint(train(cfg, resume=str(tmp_path / "c" / "ft" / "last.pt"), progress=False) / "model.pt")
    assert resumed["spec"] == frozen["spec"] and resumed["origin"] == frozen["origin"]
    assert resumed["metrics"]["epochs_run"] == 2


def test_backbone_learning_rate_and_freezing_make_the_optimizer_groups():
    from cnnserve.models.optim import make_optimizer, parameter_groups

    net = models.create_model("resnet18", num_classes=4, in_chans=3, img_size=32)
    n_head = sum(p.numel() for p in net.head.parameters())
    plain = make_optimizer(TrainConfig(arch="resnet18", lr=0.1, optimizer="sgd"),
                           parameter_groups(TrainConfig(arch="resnet18"), net))
    assert [g["lr"] for g in plain.param_groups] == [0.1]
    tuned = make_optimizer(TrainConfig(arch="resnet18", lr=0.1, optimizer="sgd"),
                           parameter_groups(TrainConfig(arch="resnet18", lr=0.1, pretrained="w.pth"), net))
    assert [g["lr"] for g in tuned.param_groups] == pytest.approx([0.01, 0.1])  # the default: a tenth
    assert sum(p.numel() for p in tuned.param_groups[1]["params"]) == n_head
    frozen = parameter_groups(TrainConfig(arch="resnet18", pretrained="w.pth", freeze_backbone=True), net)
    assert len(frozen) == 1 and sum(p.numel() for p in frozen[0]["params"]) == n_head


# --- library architectures by name, and a foreign ONNX, served and scored ---------------------------

def foreign_onnx(path, classes=4, size=64):
    """A classifier exported with plain torch.onnx.export: float input, normalisation left to the caller."""
    torch.manual_seed(0)
    net = randomise_bn(tv.models.resnet18(num_classes=classes)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, size, size),), str(path), dynamo=False)
    return net


@pytest.fixture(scope="module")
def byo_models(tmp_path_factory):
    """timm:resnet18 and torchvision:mobilenet_v3_small from local random weights, exported and stored;
    a foreign ONNX imported and stored. Returns {store name: onnx path}."""
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    save_file(randomise_bn(timm.create_model("resnet18")).state_dict(), str(d / "r18.safetensors"))
    torch.save(randomise_bn(tv.models.mobilenet_v3_small()).state_dict(), d / "mnv3.pth")
    run_cli("export", "timm:resnet18", "--weights", d / "r18.safetensors", "--out", d / "timm" / "model.onnx",
            "--store", check=True, timeout=600)
    run_cli("export", "torchvision:mobilenet_v3_small", "--weights", d / "mnv3.pth", "--out",
            d / "tv" / "model.onnx", "--store", check=True, timeout=600)
    foreign_onnx(d / "foreign.onnx")
    (d / "labels.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    proc = run_cli("import", d / "foreign.onnx", "--mean", 0.485, 0.456, 0.406, "--std", 0.229, 0.224, 0.225,
                   "--labels", d / "labels.txt", "--out", d / "foreign" / "model.onnx", check=True)
    assert "PASSED" in proc.stdout and "onnx-foreign" in proc.stdout
    assert "class activation maps available" in proc.stdout
    domains = [o.domain or "ai.onnx" for o in onnx.load_model(str(d / "foreign" / "model.onnx")).opset_import]
    assert len(domains) == len(set(domains)), domains  # one default opset, not one per merged part
    return {"timm-resnet18": d / "timm" / "model.onnx", "torchvision-mobilenet_v3_small": d / "tv" / "model.onnx",
            "onnx-foreign": d / "foreign" / "model.onnx", "dir": d}


@pytest.mark.slow
def test_library_and_imported_models_are_served_and_scored(byo_models, tmp_path):
    names = [n for n in byo_models if n != "dir"]
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (photos / f"p{i}.jpg").write_bytes(encode(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8), "JPEG"))
    srv = Server("--arg", "models=" + " ".join(f"{n}:latest" for n in names), "--arg", "workers=1")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            served = {m["name"]: m for m in c.get("/models").json()["models"]}
            assert served["timm-resnet18"]["origin"]["kind"] == "timm"
            assert served["timm-resnet18"]["spec"]["interpolation"] == "bicubic"  # timm's data config
            assert served["torchvision-mobilenet_v3_small"]["origin"] == {
                **served["torchvision-mobilenet_v3_small"]["origin"], "kind": "torchvision",
                "name": "mobilenet_v3_small", "weights": "mnv3.pth"}
            assert served["onnx-foreign"]["origin"]["kind"] == "imported"
            assert len(served["timm-resnet18"]["labels"]) == 1000 and served["timm-resnet18"]["labels"][0] == "tench"
            data = (photos / "p0.jpg").read_bytes()
            for name in names:
                r = c.post(f"/classify?model={name}&top_k=1", content=data, headers={"Content-Type": "image/jpeg"})
                assert r.status_code == 200, r.text
                local = load_model(byo_models[name], providers="cpu", warm_up=False)
                from cnnserve.core.preprocess import preprocess

                probs = local.predict(preprocess(data, local.spec)[None])[0]
                assert r.json()["predictions"][0]["index"] == int(probs.argmax())
                assert r.json()["predictions"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
            # an imported network that ends in global average pooling and one linear layer explains with CAM
            # as an exported one does (it was refused as "does not end in global average pooling")
            r = c.post("/classify/explain?model=onnx-foreign&method=cam", content=data,
                       headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            assert np.array(r.json()["map"]).shape == (64, 64) and r.json()["method"] == "cam"
    finally:
        srv.stop()
    out = tmp_path / "scores.jsonl"
    run_cli("score", photos, "--model", "timm-resnet18:latest", "--out", out, check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(not r.get("error") for r in rows)


def test_train_accepts_a_library_architecture_with_pretrained_weights(byo_models, tmp_path):
    """`train timm:NAME --pretrained FILE`: the library builds it, the weights load by name, the head
    is replaced for the data set's classes and the spec is the library's (bicubic, 224 unless told)."""
    run = train(TrainConfig(arch="timm:resnet18", data="shapes", img_size=64, limit=16, epochs=1, patience=0,
                            pretrained=str(byo_models["dir"] / "r18.safetensors"), freeze_backbone=True,
                            out=str(tmp_path / "t")), progress=False)
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt["arch"] == "timm:resnet18" and ckpt["spec"].interpolation == "bicubic"
    assert ckpt["origin"]["kind"] == "pretrained" and ckpt["origin"]["head"] == "replaced"
    assert ckpt["state_dict"]["fc.weight"].shape == (4, 512)


def tiny_graph(inputs, outputs, nodes, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def nhwc_probabilities_model(path):
    """NHWC float input -> mean over the picture -> linear -> softmax: a model that gives probabilities."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    onnx.save(tiny_graph([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 32, 3])],
                         [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 4])], nodes, [w, axes]), path)


def test_import_nhwc_probabilities_model(tmp_path):
    nhwc_probabilities_model(tmp_path / "nhwc.onnx")
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    proc = run_cli("import", tmp_path / "nhwc.onnx", "--mean", 0.5, 0.5, 0.5, "--std", 0.25, 0.25, 0.25,
                   "--labels", tmp_path / "labels.txt", "--layout", "nhwc", "--outputs", "probabilities",
                   "--out", tmp_path / "m.onnx", "--no-store", check=True)
    assert "PASSED" in proc.stdout
    m = load_model(tmp_path / "m.onnx", providers="cpu", warm_up=False)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    logits, probs = m.run(pixels, ["logits", "probabilities"])
    x = (pixels.transpose(0, 2, 3, 1) / 255.0 - 0.5) / 0.25
    z = x.mean((1, 2)) @ numpy_helper.to_array(onnx.load(tmp_path / "nhwc.onnx").graph.initializer[0])
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert np.abs(probs - want).max() < 1e-5 and np.abs(np.exp(logits) - want).max() < 1e-5
    assert m.info.origin["kind"] == "imported" and m.info.origin["layout"] == "nhwc"


def bad_models(d):
    f = TensorProto.FLOAT
    x4 = helper.make_tensor_value_info("x", f, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", f, ["n", 4])
    flat = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["y"])]
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    cases = {
        "two_inputs": (tiny_graph([x4, helper.make_tensor_value_info("x2", f, ["n", 3, 8, 8])], [y],
                                  [helper.make_node("Add", ["x", "x2"], ["s"]),
                                   helper.make_node("GlobalAveragePool", ["s"], ["g"]),
                                   helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
                                  [w]), "2 inputs (x, x2)"),
        "three_d": (tiny_graph([helper.make_tensor_value_info("x", f, ["n", 3, 8])], [y],
                               [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
                                helper.make_node("MatMul", ["m", "w"], ["y"])], [w]), "is 3-D"),
        "dynamic_size": (tiny_graph([helper.make_tensor_value_info("x", f, ["n", 3, "h", "w"])], [y], flat, [w]),
                         "dynamic height or width; give --size"),
        "not_a_vector": (tiny_graph([x4], [helper.make_tensor_value_info("g", f, ["n", 3, 1, 1])],
                                    [helper.make_node("GlobalAveragePool", ["x"], ["g"])]), "not a class vector"),
    }
    for name, (model, _) in cases.items():
        onnx.save(model, d / f"{name}.onnx")
    good = tiny_graph([x4], [y], flat, [w])
    onnx.save(good, d / "good.onnx")
    return {name: msg for name, (_, msg) in cases.items()}


def test_import_refuses_bad_models_with_one_line_each(tmp_path):
    from cnnserve.export.importer import ModelImportError, import_onnx

    expected = bad_models(tmp_path)
    kw = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "labels": list("abcd"), "log": lambda *a: None}
    for name, msg in expected.items():
        with pytest.raises(ModelImportError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            import_onnx(tmp_path / f"{name}.onnx", out=tmp_path / "out" / f"{name}.onnx", **kw)
        assert not (tmp_path / "out" / f"{name}.onnx").exists()
    with pytest.raises(ModelImportError, match="5 labels for an output of 4 classes"):
        import_onnx(tmp_path / "good.onnx", **{**kw, "labels": list("abcde")})
    with pytest.raises(ModelImportError, match="already a cnnserve export"):
        import_onnx(import_onnx(tmp_path / "good.onnx", out=tmp_path / "out" / "good.onnx", **kw)["path"], **kw)
    sized = import_onnx(tmp_path / "dynamic_size.onnx", size=(8, 8), out=tmp_path / "out" / "sized.onnx", **kw)
    assert sized["report"]["passed"] and sized["info"].spec.height == 8
    # on the command line: the same message, one line, exit status 2, nothing written
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    proc = run_cli("import", tmp_path / "two_inputs.onnx", "--mean", 0.5, 0.5, 0.5, "--std", 0.5, 0.5, 0.5,
                   "--labels", tmp_path / "labels.txt", "--no-store")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert expected["two_inputs"] in proc.stderr


def test_weights_of_another_architecture_are_named_before_labels(tmp_path):
    """ResNet-18 weights given for ResNet-34 say that they do not fit, not that the classes need names
    (the labels' message, "the weights have 3 classes: name them with --labels FILE", once came first and hid
    the mismatch)."""
    torch.save(tv.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pth")
    proc = run_cli("export", "torchvision:resnet34", "--weights", tmp_path / "r18.pth", "--out", tmp_path / "m.onnx")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tensors do not fit a model of" in proc.stderr and "--labels" not in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_library_imports_and_the_hint_for_unknown_names_work(tmp_path):
    """`import timm` and `import torchvision` work in the project's venv (its torchvision is a CUDA build
    beside a CPU-only torch: ./run.sh puts command/venvhook.py in front of the import), and the command an
    unknown name suggests runs and lists the right name (a hint whose command fails leaves the user stuck)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import timm, torchvision; m = timm.create_model('resnet18'); "
                           "print(type(m).__name__, type(torchvision.models.resnet18()).__name__)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ResNet", "ResNet"], proc.stderr
    proc = run_cli("export", "timm:resnet_18", "--weights", tmp_path / "w.pth")
    assert proc.returncode == 2 and "near names: resnet18" in proc.stderr, proc.stderr
    command = shlex.split(proc.stderr.split("`")[1])
    assert command[:2] == ["cnnserve", "models"]
    listed = run_cli(*command[1:], check=True).stdout.split()
    assert "timm:resnet18" in listed and all(n.startswith("timm:") for n in listed)
