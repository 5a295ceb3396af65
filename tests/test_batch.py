"""Batch scoring on real files, with every engine, kills and resumes."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cnnserve.scoring.run import ScoreError, collect_inputs, read_predictions, score
from cnnserve.core.preprocess import preprocess
from tests.conftest import CNNSERVE, ROOT, encode, run_cli


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits_test):
    """40 held-out digits as PNG and JPEG in sub-folders, plus four broken files."""
    root = tmp_path_factory.mktemp("images")
    x, y = digits_test
    for i in range(40):
        sub = root / ("png" if i % 2 == 0 else "jpeg")
        sub.mkdir(exist_ok=True)
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        (sub / f"{i:03d}_{y[i]}.{ext}").write_bytes(encode(x[i][0], fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    bad = root / "bad"
    bad.mkdir()
    good = encode(x[0][0])
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not a picture")
    (bad / "noise.bmp").write_bytes(os.urandom(300))
    return root


def by_path(rows):
    return {r["path"]: r for r in rows}


def test_local_engine_scores_everything_and_keeps_errors(image_dir, default_onnx, tmp_path):
    out = tmp_path / "p.csv"
    s = score([str(image_dir)], str(out), model=str(default_onnx), top_k=3, batch_size=8, progress=False)
    assert (s["scored"], s["failed"]) == (40, 4) and not s["interrupted"]
    rows = read_predictions(out)
    assert [r["path"] for r in rows] == collect_inputs([str(image_dir)]).paths  # stable, sorted order
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"truncated.png", "empty.png", "text.jpg", "noise.bmp"}
    assert "empty" in errors["empty.png"] and "truncated" in errors["truncated.png"]
    good = [r for r in rows if not r["error"]]
    assert all(len(r["labels"]) == 3 for r in good)
    correct = sum(r["labels"][0] == Path(r["path"]).stem.split("_")[1] for r in good)
    assert correct >= 36
    # the same answer as the exported model on the same decoded pixels, in-process
    sess = ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])
    from cnnserve.core.onnxmeta import ModelInfo

    spec = ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map).spec
    r = good[5]
    probs = sess.run(["probabilities"], {"pixels": preprocess(Path(r["path"]).read_bytes(), spec)[None]})[0][0]
    assert spec.labels[int(probs.argmax())] == r["labels"][0]
    assert r["probabilities"][0] == pytest.approx(float(probs.max()), rel=1e-5)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_output_formats_agree(image_dir, default_onnx, tmp_path, ext):
    base, other = tmp_path / "p.csv", tmp_path / f"p.{ext}"
    score([str(image_dir)], str(base), model=str(default_onnx), progress=False)
    score([str(image_dir)], str(other), model=str(default_onnx), progress=False)
    a, b = read_predictions(base), read_predictions(other)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["labels"] == rb["labels"] and ra["error"] == rb["error"]
        assert np.allclose(ra["probabilities"], rb["probabilities"], rtol=1e-5)
    assert not list(tmp_path.glob("*.partial.jsonl"))


def test_manifests_globs_and_bad_lines(image_dir, default_onnx, tmp_path):
    pngs = sorted((image_dir / "png").glob("*.png"))
    (tmp_path / "list.txt").write_text("# a comment\n\n" + "\n".join(str(p) for p in pngs[:3]) + "\n")
    rel = tmp_path / "sub"
    rel.mkdir()
    (rel / "m.csv").write_text("path,label\n" + f"{pngs[3]},x\n" + ",empty\n" + f"{tmp_path / 'missing.png'},y\n")
    found = collect_inputs([str(tmp_path / "list.txt"), str(rel / "m.csv"), str(image_dir / "jpeg" / "*.jpg")])
    assert found.paths[:4] == [str(p) for p in pngs[:4]]
    assert found.bad == [(f"{rel / 'm.csv'}:3", "bad manifest line: no path")]
    out = tmp_path / "p.jsonl"
    s = score([str(tmp_path / "list.txt"), str(rel / "m.csv"), str(image_dir / "jpeg" / "*.jpg")], str(out),
              model=str(default_onnx), progress=False)
    rows = by_path(read_predictions(out))
    assert rows[f"{rel / 'm.csv'}:3"]["error"] == "bad manifest line: no path"
    assert "cannot read" in rows[str(tmp_path / "missing.png")]["error"]
    assert s["scored"] == 4 + 20 and s["failed"] == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(p) for p in pngs[:2]]}), tmp_path / "m.parquet")
    assert collect_inputs([str(tmp_path / "m.parquet")]).paths == [str(p) for p in pngs[:2]]
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    with pytest.raises(ScoreError, match="no 'path' column"):
        collect_inputs([str(tmp_path / "nopath.csv")])


@pytest.mark.slow
def test_engines_give_identical_predictions(image_dir, default_onnx, server, tmp_path):
    """local, http (a real server of the same model) and ray (a local Ray with 2 CPUs) agree."""
    results = {}
    for engine, kw in (("local", {"model": str(default_onnx)}), ("http", {"url": server.url}),
                       ("ray", {"model": str(default_onnx), "workers": 2})):
        out = tmp_path / f"{engine}.jsonl"
        s = score([str(image_dir)], str(out), engine=engine, batch_size=8, progress=False, **kw)
        assert (s["scored"], s["failed"]) == (40, 4), engine
        results[engine] = read_predictions(out)
    local = results["local"]
    for engine in ("http", "ray"):
        other = results[engine]
        assert [r["path"] for r in other] == [r["path"] for r in local], engine
        for a, b in zip(local, other):
            assert a["labels"] == b["labels"], (engine, a["path"])
            assert bool(a["error"]) == bool(b["error"]), (engine, a["path"])
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5), (engine, a["path"])
    # the service and the local engine decode with the same code: same error messages too
    assert [r["error"] for r in results["http"]] == [r["error"] for r in local]


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory):
    """A job slow enough to kill midway: a random-weight ResNet-18 at 224 px and 300 JPEGs."""
    import torch

    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.export.files import save
    from cnnserve.export.trace import to_onnx
    from cnnserve.models.registry import build_classifier, spec_for

    root = tmp_path_factory.mktemp("slow")
    torch.manual_seed(0)
    spec = spec_for("resnet18", ("a", "b", "c"))
    model_path = save(to_onnx(build_classifier(spec).eval(), ModelInfo(spec=spec)), root / "r18.onnx")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        (images / f"{i:04d}.jpg").write_bytes(encode(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8), "JPEG"))
    return model_path, images


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def whole_rows(path: Path, header: bool) -> int:
    """Rows a killed scorer left whole: its lines that end (a kill mid-write tears the last), less a header."""
    return count_lines(path) - header


@pytest.mark.slow
@pytest.mark.parametrize("sig, ext", [(signal.SIGKILL, "jsonl"), (signal.SIGINT, "csv"), (signal.SIGKILL, "parquet")])
def test_killed_run_resumes_to_exactly_once(slow_job, tmp_path, sig, ext):
    model_path, images = slow_job
    out = tmp_path / f"p.{ext}"
    written = out.with_name(out.name + ".partial.jsonl") if ext == "parquet" else out
    # decoding processes (what a large job uses): a killed scorer must leave none behind holding its pipes
    args = ["score", images, "--model", model_path, "--out", out, "--batch-size", "4", "--workers", "2",
            "--providers", "cpu", "--decoders", "processes"]
    proc = subprocess.Popen([*CNNSERVE, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while count_lines(written) < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    partial = whole_rows(written, header=ext == "csv")
    assert 20 <= partial < 300, partial  # stopped part of the way through
    if sig == signal.SIGINT:  # a clean stop: says how to resume, exit 130
        assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    again = run_cli(*args)  # without --resume an existing output is not overwritten
    assert again.returncode == 2 and "--resume" in again.stderr
    done = run_cli(*args, "--resume", check=True)
    # the resumed run takes the interrupted one's whole rows as done and scores every other input
    counts = re.search(r"(\d+) scored, (\d+) failed, (\d+) already done", done.stderr)
    assert counts and [int(n) for n in counts.groups()] == [300 - partial, 0, partial], done.stderr
    rows = read_predictions(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p) for p in images.glob("*.jpg"))  # every input exactly once
    assert len(paths) == len(set(paths)) == 300
    assert all(not r["error"] and len(r["labels"]) == 3 for r in rows)


@pytest.mark.slow
def test_progress_reaches_a_log_before_the_end(slow_job, tmp_path):
    """Scoring into a log file or pipe (no terminal) shows progress lines while it runs, not only at the end
    (the progress bar's redraws once never reached a log)."""
    import threading

    model_path, images = slow_job
    proc = subprocess.Popen([*CNNSERVE, "score", str(images), "--model", str(model_path), "--out",
                             str(tmp_path / "p.jsonl"), "--batch-size", "4", "--providers", "cpu"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []  # (line, whether the scorer was still running when it arrived)

    def read() -> None:
        for line in proc.stderr:
            seen.append((line.strip(), proc.poll() is None and count_lines(tmp_path / "p.jsonl") < 300))

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=30)
    lines = [(line, running) for line, running in seen if re.match(r"scoring: [\d,]+/300 \(\d+%\), \d+ img/s", line)]
    assert lines and lines[0][1], seen  # the first one came while images were still being scored
    assert "300 scored, 0 failed" in seen[-1][0]


@pytest.mark.slow
def test_a_top_k_the_model_cannot_give_is_refused_as_the_service_refuses_it(image_dir, default_onnx, server, tmp_path):
    """The service answers top_k=11 on a 10-class model with 400; score clamped it to 10 without a word. One
    rule: refused by every engine before anything is written, naming the model and its classes."""
    import urllib.error
    import urllib.request

    png = next((image_dir / "png").iterdir()).read_bytes()
    request = urllib.request.Request(server.url + "/classify?top_k=11", data=png, headers={"Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 400 and json.load(answer.value)["code"] == "bad_top_k"
    for k in ("11", "0"):
        out = tmp_path / f"k{k}.csv"
        r = run_cli("score", image_dir, "--model", default_onnx, "--out", out, "--top-k", k)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"--top-k {k}: " in r.stderr and f"{default_onnx}" in r.stderr, r.stderr
        assert "has 10 classes (0, 1, 2," in r.stderr and "between 1 and 10" in r.stderr, r.stderr
        assert not out.exists()
    with pytest.raises(ScoreError, match=r"--top-k 11: .* has 10 classes.*between 1 and 10"):
        score([str(image_dir)], str(tmp_path / "h.csv"), engine="http", url=server.url, top_k=11, progress=False)
    assert not (tmp_path / "h.csv").exists()


def test_top_k_follows_the_services_rule_on_a_model_with_few_classes():
    """A 4-class model: no --top-k gives the default clamped to its classes (as a request without top_k gets),
    --top-k 9 is refused naming the model and its classes (as top_k=9 is a 400)."""
    from cnnserve.scoring.run import check_top_k

    labels = ["circle", "square", "triangle", "star"]
    assert check_top_k(None, "model shapes.onnx", labels) == 4 and check_top_k(3, "m", labels) == 3
    with pytest.raises(ScoreError, match=r"--top-k 9: model shapes.onnx has 4 classes \(circle, square, triangle, "
                                         r"star\); give --top-k between 1 and 4"):
        check_top_k(9, "model shapes.onnx", labels)


def test_fail_on_error_and_cli_errors(image_dir, default_onnx, tmp_path):
    out = tmp_path / "p.csv"
    ok = run_cli("score", image_dir, "--model", default_onnx, "--out", out)
    assert ok.returncode == 0 and "40 scored, 4 failed" in ok.stderr
    strict = run_cli("score", image_dir, "--model", default_onnx, "--out", out, "--overwrite", "--fail-on-error")
    assert strict.returncode == 1
    for args, message in ((["score", tmp_path / "nowhere", "--model", default_onnx, "--out", tmp_path / "x.csv"],
                           "nowhere: no such file, folder or matching glob"),
                          (["score", image_dir, "--model", default_onnx, "--out", tmp_path / "x.xlsx"],
                           "unknown output format"),
                          (["score", image_dir, "--model", tmp_path / "none.onnx", "--out", tmp_path / "y.csv"],
                           "none.onnx: no such ONNX file"),
                          (["score", image_dir, "--engine", "http", "--out", tmp_path / "z.csv"], "needs --url")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_scoring_by_model_store_tag(image_dir, stored_default, tmp_path):
    out = tmp_path / "p.jsonl"
    s = score([str(image_dir / "png")], str(out), model=stored_default, progress=False)
    assert s["scored"] == 20
    assert json.loads(out.read_text().splitlines()[0])["labels"]
    # without --model: the service's default model, as `bentoml serve` would use
    default = run_cli("score", image_dir / "png", "--out", tmp_path / "d.jsonl")
    assert default.returncode == 0, default.stderr
    assert read_predictions(tmp_path / "d.jsonl") == read_predictions(out)


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory, digits_test):
    """20 good digits, and beside them a LAB TIFF, a non-UTF-8 file name, names with a newline and a
    comma, and (through a manifest) a FIFO: each must get its own row, exactly once."""
    root = tmp_path_factory.mktemp("odd")
    folder = root / "images"
    folder.mkdir()
    x, _ = digits_test
    for i in range(20):
        (folder / f"{i:03d}.png").write_bytes(encode(x[i][0]))
    buf = io.BytesIO()
    Image.new("LAB", (28, 28)).save(buf, "TIFF")
    (folder / "lab.tif").write_bytes(buf.getvalue())
    os.close(os.open(os.fsencode(folder) + b"/latin-1 caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    Path(os.fsdecode(os.fsencode(folder) + b"/latin-1 caf\xe9.png")).write_bytes(encode(x[20][0]))
    (folder / "new\nline, \"quoted\".png").write_bytes(encode(x[21][0]))
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    manifest = root / "more.txt"
    manifest.write_text(f"{fifo}\n")
    return folder, manifest, 20 + 3 + 1


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_odd_files_get_error_rows_and_resume_scores_each_once(odd_inputs, default_onnx, tmp_path, ext):
    folder, manifest, n = odd_inputs
    out = tmp_path / f"preds.{ext}"
    args = ["score", str(folder), str(manifest), "--model", default_onnx, "--out", out, "--batch-size", "8"]
    first = run_cli(*args, timeout=120)  # a FIFO read would hang here
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    rows = read_predictions(out)
    assert len(rows) == n and len({r["path"] for r in rows}) == n
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "cannot be converted" in errors.pop("lab.tif") or "LAB" in str(errors)
    assert "FIFO" in errors.pop("pipe.png")
    assert not errors, errors  # the odd names were scored like any other
    names = {Path(r["path"]).name for r in rows}
    assert "new\nline, \"quoted\".png" in names
    assert ("latin-1 caf\\xe9.png" if ext == "parquet" else os.fsdecode(b"latin-1 caf\xe9.png")) in names
    again = run_cli(*args, "--resume", timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"scoring 0 inputs ({n} already in" in again.stderr
    assert len(read_predictions(out)) == n


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_a_full_disk_is_reported_and_nothing_is_finalized_short(image_dir, default_onnx, tmp_path, ext):
    """The output cannot grow past 3 kB (RLIMIT_FSIZE stands in for a full disk): the run says it
    cannot write, keeps what it wrote, never finalizes; --resume with room completes it exactly once."""
    import resource

    out = tmp_path / f"preds.{ext}"
    args = [*CNNSERVE, "score", str(image_dir), "--model", str(default_onnx), "--out", str(out), "--batch-size", "4"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    full = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=small_disk, cwd=ROOT)
    assert full.returncode == 2, full.stderr
    assert "cannot write: File too large" in full.stderr and "--resume" in full.stderr
    assert "Traceback" not in full.stderr
    assert not out.exists() if ext == "parquet" else out.stat().st_size <= 3000
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = read_predictions(out)
    assert len(rows) == len({r["path"] for r in rows}) == len(collect_inputs([str(image_dir)]).paths)


def test_outputs_and_other_files_are_never_taken_for_inputs_or_predictions(image_dir, default_onnx, tmp_path):
    """Files a scorer could mistake for inputs or for predictions: a manifest named as its own output, a file
    that is not a predictions file, the same file under two names, and an output that a glob also finds."""
    good = sorted((image_dir / "png").glob("*.png"))[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{good}\n")
    before = manifest.read_bytes()
    proc = run_cli("score", manifest, "--model", default_onnx, "--out", manifest, "--resume")
    assert proc.returncode == 2 and "is this run's output" in proc.stderr, proc.stderr
    assert manifest.read_bytes() == before  # untouched: no prediction rows appended to the manifest

    # resuming into a file that is not a predictions file: refused, the file left as it was
    for name, content in (("notes.csv", "name,size\na,1\n"), ("notes.jsonl", '{"name": "a"}\n'),
                          ("torn.jsonl", "hello"), ("torn.csv", "path,size")):
        other = tmp_path / name
        other.write_text(content)
        with pytest.raises(ScoreError, match="cannot be resumed"):
            score([str(good)], str(other), model=str(default_onnx), resume=True, progress=False)
        assert other.read_text() == content, name
    k3 = tmp_path / "k3.csv"  # a predictions file written with another top-k says which
    score([str(good)], str(k3), model=str(default_onnx), top_k=3, progress=False)
    with pytest.raises(ScoreError, match="resume it with --top-k 3"):
        score([str(good)], str(k3), model=str(default_onnx), top_k=5, resume=True, progress=False)

    # one row per real file, under the name it was first given
    (tmp_path / "sub").mkdir()
    shutil.copy(good, tmp_path / "good.png")
    os.symlink(tmp_path / "good.png", tmp_path / "link.png")
    once = tmp_path / "once.jsonl"
    s = score([str(tmp_path / "good.png"), str(tmp_path / "sub" / ".." / "good.png"), str(tmp_path / "link.png")],
              str(once), model=str(default_onnx), progress=False)
    assert s["scored"] == 1 and [r["path"] for r in read_predictions(once)] == [str(tmp_path / "good.png")]

    # an output that a glob finds is never scored as an image (here on --resume, when it exists)
    folder = tmp_path / "g"
    folder.mkdir()
    for i in range(3):
        shutil.copy(good, folder / f"{i}.png")
    out = folder / "preds.jsonl"
    score([str(folder / "*")], str(out), model=str(default_onnx), progress=False)
    s = score([str(folder / "*")], str(out), model=str(default_onnx), resume=True, progress=False)
    rows = read_predictions(out)
    assert s["already_done"] == 3 and len(rows) == 3 and not any(r["error"] for r in rows), rows
