"""ONNX export: self-contained files with their spec, verified against PyTorch; the model store."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnnserve import models
from cnnserve.core.onnxmeta import INPUT, OUTPUTS, ModelInfo
from cnnserve.export.files import ExportError
from cnnserve.export.pipeline import export_checkpoint
from cnnserve.export.trace import to_onnx
from cnnserve.export.store import StoreError, read_info, store_model
from cnnserve.export.verify import TOLERANCES, verify
from cnnserve.models.checkpoint import file_sha256, save_checkpoint
from cnnserve.models.registry import build_classifier, spec_for
from tests.conftest import run_cli


def test_default_export_is_self_contained_and_described(default_run, default_onnx, tmp_path):
    assert not list(default_run.glob("*.onnx.data"))
    moved = tmp_path / "elsewhere.onnx"  # one file is the whole model: it runs from anywhere
    shutil.copyfile(default_onnx, moved)
    proto = onnx.load(str(moved))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = proto.graph.input
    assert inp.name == INPUT and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [o.name for o in proto.graph.output] == list(OUTPUTS)

    props = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_metadata(props)
    ckpt = torch.load(default_run / "model.pt", weights_only=True)
    assert info.spec.arch == "lenet5" and info.spec.labels == tuple("0123456789")
    assert info.spec.mean == tuple(ckpt["spec"]["mean"]) and info.spec.resize == "stretch"
    assert info.metrics["test_accuracy"] == ckpt["metrics"]["test_accuracy"]
    assert info.checkpoint_sha256 == file_sha256(default_run / "model.pt")
    assert info.versions["torch"].startswith("2.") and info.versions["onnx"] == onnx.__version__
    assert json.loads(props["cnnserve.labels"]) == list("0123456789")


def test_normalisation_is_inside_the_graph(default_run, default_onnx):
    """Raw uint8 pixels in, the checkpoint's predictions out: no client-side normalisation."""
    from cnnserve.models.checkpoint import classifier_from_checkpoint, load_checkpoint
    from cnnserve.models.data import load_dataset

    ckpt = load_checkpoint(default_run)
    test = load_dataset("digits", ckpt["spec"]).test
    x = np.stack([test[i][0].numpy() for i in range(50)])
    sess = ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(None, {INPUT: x})
    with torch.no_grad():
        ref = classifier_from_checkpoint(ckpt)(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() < 1e-4
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert sess.run(None, {INPUT: x[:1]})[0].shape == (1, 10)  # dynamic batch


def test_verification_report(default_run, default_onnx):
    report = json.loads(default_onnx.with_name("model.verify.json").read_text())
    ckpt_acc = torch.load(default_run / "model.pt", weights_only=True)["metrics"]["test_accuracy"]
    assert report["passed"] and report["n_images"] == 360
    assert report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["provider"] == "CPUExecutionProvider"
    assert abs(report["accuracy_onnxruntime"] - ckpt_acc) <= 0.001


def test_fp16_variant(default_run, tmp_path):
    results = export_checkpoint(default_run, tmp_path / "m.onnx", fp16=True, log=lambda *a: None)
    half = results[1]
    assert half["path"].name == "m.fp16.onnx" and half["info"].precision == "fp16"
    r = half["report"]
    assert r["passed"] and r["top1_agreement"] >= 0.995 and r["provider"] in ort.get_available_providers()
    sess = ort.InferenceSession(str(half["path"]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_outputs()[0].type == "tensor(float)"
    assert ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map).precision == "fp16"
    assert half["path"].stat().st_size < 0.7 * results[0]["path"].stat().st_size


def test_failed_verification_writes_no_model(default_run, tmp_path):
    """A checkpoint whose recorded accuracy the export cannot reproduce fails loudly."""
    ckpt = torch.load(default_run / "model.pt", weights_only=True)
    ckpt["metrics"]["test_accuracy"] = 0.5
    ckpt.pop("format")
    save_checkpoint(tmp_path / "lying.pt", ckpt)
    with pytest.raises(ExportError, match="verification failed.*accuracy"):
        export_checkpoint(tmp_path / "lying.pt", tmp_path / "lying.onnx", log=lambda *a: None)
    assert not (tmp_path / "lying.onnx").exists()
    assert not json.loads((tmp_path / "lying.verify.json").read_text())["passed"]


SMALLEST = {"lenet5": 28, "lenet5_classic": 32}


# One architecture per kind of layer the exporter must get right: depth alone (ResNet-34 against -18,
# VGG-13/16/19 against VGG-11) adds more of the same operators, and took half of this test's time.
KINDS = {"lenet5", "lenet5_classic", "alexnet", "zfnet", "vgg11", "vgg11_bn", "resnet18", "resnet50", "googlenet",
         "densenet121", "mobilenet_v1"}


def test_every_kind_of_layer_is_covered():
    """Each registry family is in the parity test below; a new family must join it."""
    assert KINDS <= set(models.list_models())
    assert {models.get_entry(n).family for n in models.list_models()} == {models.get_entry(n).family for n in KINDS}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_of_architecture_exports_with_parity(name):
    size = SMALLEST.get(name, 32)
    channels = models.default_spec(name).channels
    spec = spec_for(name, ("a", "b", "c"), channels, size)
    torch.manual_seed(0)
    model = build_classifier(spec).eval()
    proto = to_onnx(model, ModelInfo(spec=spec))
    blob = proto.SerializeToString()
    images = np.random.default_rng(1).integers(0, 256, (7, *spec.input_shape), dtype=np.uint8)
    for batch in (1, 7):
        report = verify(blob, model, images, batch_size=batch)
        # the export's own gate, as it stands: exact top-1 agreement and an absolute logit tolerance
        assert report["top1_agreement"] == 1.0, report
        assert report["max_abs_logit_diff"] <= TOLERANCES["fp32"]["max_abs_logit_diff"], report


def test_store_shows_spec_and_labels(default_onnx):
    model = store_model(default_onnx)
    assert model.tag.name == "lenet5-digits"
    meta = model.info.metadata
    assert meta["spec"]["height"] == 28 and meta["labels"] == list("0123456789")
    assert Path(model.path_of("model.onnx")).read_bytes() == default_onnx.read_bytes()
    shown = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "models", "get",
                            "lenet5-digits:latest"], capture_output=True, text=True, check=True).stdout
    assert "labels:" in shown and "spec:" in shown and "resize: stretch" in shown


def test_export_cli_with_store(default_run, tmp_path):
    proc = run_cli("export", default_run / "model.pt", "--out", tmp_path / "cli.onnx", "--store", "--name",
                   "cli-model", check=True)
    assert "PASSED" in proc.stdout and "stored" in proc.stdout
    import bentoml

    assert bentoml.models.get("cli-model:latest").info.labels["arch"] == "lenet5"


def test_store_refuses_foreign_onnx(tmp_path, default_onnx):
    proto = onnx.load(str(default_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(StoreError, match="not a cnnserve export"):
        read_info(tmp_path / "plain.onnx")
    # an ONNX file made elsewhere is imported, not exported (the hint once said `cnnserve export`)
    proc = run_cli("store", tmp_path / "plain.onnx")
    assert proc.returncode == 2 and f"cnnserve import {tmp_path / 'plain.onnx'} --mean" in proc.stderr
    (tmp_path / "text.onnx").write_text("hello")
    proc = run_cli("store", tmp_path / "text.onnx")
    assert proc.returncode == 2 and "text.onnx: not an ONNX file" in proc.stderr


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def bad_checkpoints(default_run, tmp_path):
    good = (default_run / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.pt").write_text("just some text")
    torch.save({"format": "cnnserve-checkpoint/1", "x": Payload()}, tmp_path / "pickled.pt")
    ckpt = torch.load(default_run / "model.pt", weights_only=True)
    ckpt["arch"] = ckpt["spec"]["arch"] = "resnet18"  # LeNet weights declared as a ResNet
    torch.save(ckpt, tmp_path / "mismatch.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    return {
        "missing.pt": "no such file",
        "truncated.pt": "not a readable PyTorch checkpoint",
        "notes.pt": "not a readable PyTorch checkpoint",
        "pickled.pt": "refused to load",
        "mismatch.pt": "weights do not fit architecture 'resnet18'",
        "foreign.pt": "not a cnnserve checkpoint",
    }


def test_export_bad_checkpoints_give_one_clear_line(default_run, tmp_path):
    for name, message in bad_checkpoints(default_run, tmp_path).items():
        proc = run_cli("export", tmp_path / name)
        assert proc.returncode == 2, name
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1, err
        assert str(tmp_path / name) in err and message in err, err
        assert "this must never run" not in proc.stdout + err


def test_export_never_overwrites_silently(default_run, tmp_path):
    """Exports replace only their own earlier files (an export of the same checkpoint); anything else at
    --out is refused before any work, and --overwrite replaces it with the variants and reports beside it.
    A checkpoint made from --weights is named after --out (`--out DIR/mine.onnx` once wrote
    DIR/model.pt over an unrelated file)."""
    out = tmp_path / "m.onnx"
    out.write_text("someone's notes")
    proc = run_cli("export", default_run, "--out", out)
    assert proc.returncode == 2 and f"{out} exists and is not a cnnserve export" in proc.stderr, proc.stderr
    assert "--overwrite" in proc.stderr and out.read_text() == "someone's notes"
    out.unlink()
    export_checkpoint(default_run, out, log=lambda *a: None)
    export_checkpoint(default_run, out, log=lambda *a: None)  # the same checkpoint again: its own file
    # weights by name: the checkpoint is DIR/m2.pt beside DIR/m2.onnx, and DIR/model.pt is left alone
    (tmp_path / "model.pt").write_text("unrelated")
    state = torch.load(default_run / "model.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "lenet.pth")
    (tmp_path / "labels.txt").write_text("".join(f"digit {i}\n" for i in range(10)))
    other = tmp_path / "m2.onnx"
    proc = run_cli("export", "lenet5", "--weights", tmp_path / "lenet.pth", "--labels", tmp_path / "labels.txt",
                   "--out", other, check=True)
    assert f"checkpoint {tmp_path / 'm2.pt'}" in proc.stdout and (tmp_path / "model.pt").read_text() == "unrelated"
    assert other.is_file()
    # another checkpoint onto m.onnx: refused; with --overwrite, replaced, and the old variants go too
    (tmp_path / "m.int8.onnx").write_bytes(out.read_bytes())
    (tmp_path / "m.int8.verify.json").write_text("{}")
    proc = run_cli("export", tmp_path / "m2.pt", "--out", out)
    assert proc.returncode == 2 and "was exported from another checkpoint" in proc.stderr, proc.stderr
    assert read_info(out).checkpoint_sha256 == file_sha256(default_run / "model.pt")
    run_cli("export", tmp_path / "m2.pt", "--out", out, "--overwrite", check=True)
    assert read_info(out).checkpoint_sha256 == file_sha256(tmp_path / "m2.pt")
    assert not (tmp_path / "m.int8.onnx").exists() and not (tmp_path / "m.int8.verify.json").exists()


def test_import_help_says_how_it_resizes():
    """The resize policy decides whether the user's own preprocessing matches the service's: --help says the
    defaults (the help once named the options without them)."""
    text = " ".join(run_cli("import", "--help", check=True).stdout.split())
    assert "default center-crop" in text and "default 0.875" in text and "default bilinear" in text


def test_storing_the_same_export_again_reuses_its_version(default_onnx, tmp_path, capsys):
    """`cnnserve export --store` of a checkpoint exported before stored a byte-identical new version each time; it
    now names the version that holds the same files. Other files (or another name) still make a new version."""
    from cnnserve.command.make import store

    first = store(default_onnx, "reuse-check")
    again = store(default_onnx, "reuse-check")
    out = capsys.readouterr().out
    assert again == first and "already in BentoML's model store" in out and "no new version" in out
    changed = tmp_path / "model.onnx"
    proto = onnx.load(str(default_onnx))
    proto.doc_string = "another export"
    onnx.save(proto, str(changed))
    assert store(changed, "reuse-check") != first
    assert str(store_model(default_onnx, "reuse-check").tag) != first  # the library call stores as asked
