"""What the network sees: /classify/explain (occlusion and CAM) on a real server, `cnnserve visualize`
for every family, and the /demo page driven in a real browser (Debian's chromium)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cnnserve.export.pipeline import export_checkpoint
from cnnserve.export.store import store_model
from tests.conftest import ROOT, Server, encode, run_cli

ARTIFACTS = Path(os.environ.get("CNNSERVE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def explain_server(stored_default, shapes_resnet_run, tmp_path_factory):
    """The default LeNet-5 and a small ResNet-18 (a GAP + linear head, so CAM) on one real server."""
    out = tmp_path_factory.mktemp("explain") / "resnet.onnx"
    store_model(export_checkpoint(shapes_resnet_run, out, log=lambda *a: None)[0]["path"], "resnet18-explain")
    srv = Server("--arg", f"models={stored_default} resnet18-explain:latest", "--arg", "workers=1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(explain_server):
    with httpx.Client(base_url=explain_server.url, timeout=60) as c:
        yield c


def corner_digit(digits_test) -> tuple[bytes, int]:
    """A held-out digit pasted into the top-left quarter of a blank canvas twice its size (the model
    resizes the whole canvas, so the digit fills the top-left quarter of its input)."""
    x, y = digits_test
    canvas = np.zeros((56, 56), np.uint8)
    canvas[:28, :28] = x[0][0]
    return encode(canvas), int(y[0])


def test_occlusion_map_peaks_on_the_digit(client, digits_test):
    data, _ = corner_digit(digits_test)
    r = client.post("/classify/explain", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    heat = np.array(body["map"])
    assert body["method"] == "occlusion" and body["map_shape"] == [28, 28] and heat.shape == (28, 28)
    assert body["patch"] == 4 and body["stride"] == 2 and body["occlusions"] == 13 * 13
    assert body["target"]["index"] == body["predictions"][0]["index"]  # the top class by default
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 14 and x < 14, f"the map's peak {(y, x)} is not on the digit (top-left quarter)"
    assert heat[:14, :14].mean() > heat[14:, 14:].mean()
    assert {"decode", "queue", "inference", "explain", "total"} <= {
        part.split(";")[0].strip() for part in r.headers["Server-Timing"].split(",")}


def test_occlusion_png_and_an_explicit_target(client, digits_test):
    data, _ = corner_digit(digits_test)
    r = client.post("/classify/explain", content=data, headers={"Content-Type": "image/png"},
                    params={"format": "png", "target": 3, "patch": 7, "stride": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.width == 224 and img.height > 224  # 28 px enlarged to 224, captions around
    assert r.headers["X-Target-Index"] == "3" and 0 <= float(r.headers["X-Probability"]) <= 1


def test_heatmap_png_names_its_class_and_has_a_colour_scale(client, digits_test):
    """The PNG says which class it explains and carries its colour scale (it once had neither).
    The scale is the map's own colour ramp, left (0) to right (the largest value); the caption differs
    with the class; the PNG's Title says the same in text."""
    from cnnserve.service.explain import _LUT

    data, _ = corner_digit(digits_test)
    pictures = {}
    for target in (3, 5):
        r = client.post("/classify/explain", content=data, headers={"Content-Type": "image/png"},
                        params={"format": "png", "target": target})
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content))
        label = f'"{target}"'  # the digits' labels are their digits
        assert label in img.info["Title"] and f"p = {float(r.headers['X-Probability']):.3f}" in img.info["Title"]
        pictures[target] = np.asarray(img.convert("RGB")).astype(int)
    a = pictures[3]
    # a row of the colour scale: runs from the ramp's first colour to its last, in its order
    bar_rows = [y for y in range(a.shape[0] - 40, a.shape[0])
                if np.abs(a[y, 4] - _LUT[0]).max() <= 2 and np.abs(a[y, a.shape[1] - 5] - _LUT[255]).max() <= 2]
    assert bar_rows, "no colour scale below the map"
    row = a[bar_rows[0], 4:a.shape[1] - 4]
    nearest = [int(np.abs(_LUT.astype(int) - px).sum(1).argmin()) for px in row]
    assert nearest == sorted(nearest) and nearest[0] == 0 and nearest[-1] == 255
    # the caption above the map: text (dark pixels on white), different for another class
    caption = slice(0, 20)
    assert (a[caption] < 100).any() and not np.array_equal(a[caption], pictures[5][caption])


def _batches(client, model: str) -> float:
    """How many onnxruntime runs the model's batcher has made (cnnserve_batch_size_count)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("cnnserve_batch_size_count") and f'model="{model}"' in line)


def test_cam_for_gap_heads_and_a_reason_for_others(client):
    img = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    before = _batches(client, "resnet18-explain")
    r = client.post("/classify/explain", content=img, params={"model": "resnet18-explain", "method": "cam"},
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    # the CAM pass went through the model's batcher (queue, limits, priorities), not around it
    assert _batches(client, "resnet18-explain") == before + 1
    assert r.headers["Server-Timing"].count("queue;") == 1
    heat = np.array(r.json()["map"])
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-4)
    occ = client.post("/classify/explain", content=img, params={"model": "resnet18-explain"},
                      headers={"Content-Type": "image/png"})
    assert occ.status_code == 200 and occ.json()["occlusions"] == 15 * 15  # 32 px: patch 5, stride 2, plus the edge
    r = client.post("/classify/explain", content=encode(np.zeros((28, 28), np.uint8)), params={"method": "cam"},
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and r.json()["code"] == "cam_unavailable" and "use method=occlusion" in r.json()["error"]


def test_cam_outputs_are_the_head_and_the_served_map_is_their_cam(client):
    """What the CAM outputs are, checked against the model itself, not only the map's shape: for a GAP +
    linear head, each logit is the spatial mean of its class's weighted feature maps plus a constant (its
    bias), for any image; and the map the server answers is ``explain.cam`` of those outputs, computed here
    outside the batcher, whose native-size map is the rectified weighted sum."""
    from cnnserve.core.onnxmeta import CAM_WEIGHTS, FEATURES, LOGITS, MODEL_FILE
    from cnnserve.core.preprocess import preprocess
    from cnnserve.core.runtime import create_session, load_model
    from cnnserve.core.store import stored_model
    from cnnserve.service.explain import cam

    path = stored_model("resnet18-explain:latest").path_of(MODEL_FILE)
    spec = load_model(path, providers="cpu", warm_up=False).spec
    sess = create_session(path, "cpu")
    rng = np.random.default_rng(1)
    pngs = [encode(rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = np.stack([preprocess(p, spec) for p in pngs])
    logits, features, weights = sess.run([LOGITS, FEATURES, CAM_WEIGHTS], {"pixels": pixels})
    class_means = np.einsum("kc,nchw->nk", weights, features) / (features.shape[2] * features.shape[3])
    bias = logits - class_means
    assert np.abs(bias[0] - bias[1]).max() < 1e-3, "the CAM outputs are not the classifier head"
    assert np.ptp(logits[0] - logits[1]) > 1e-2  # two images the model tells apart: the check has teeth
    target = int(logits[0].argmax())
    native = np.maximum(np.tensordot(weights[target], features[0], axes=1), 0)
    h, w = native.shape
    assert np.allclose(cam(features[0], weights, target, (h, w)), native / native.max(), atol=1e-5)
    served = client.post("/classify/explain", content=pngs[0], headers={"Content-Type": "image/png"},
                         params={"model": "resnet18-explain", "method": "cam"})
    assert served.status_code == 200 and served.json()["target"]["index"] == target
    assert np.allclose(np.array(served.json()["map"]), cam(features[0], weights, target, (spec.height, spec.width)),
                       atol=1e-4)


@pytest.mark.parametrize("params, status, code", [
    ({"method": "gradients"}, 400, "bad_method"),
    ({"patch": 1, "stride": 1}, 400, "too_many_occlusions"),  # 784 copies > max_occlusions 256
    ({"patch": 40}, 400, "bad_patch"),
    ({"patch": 0}, 400, "bad_patch"),  # 0 is a value, not "unset": refused, not defaulted
    ({"stride": 0}, 400, "bad_patch"),
    ({"target": 10}, 400, "bad_target"),
    ({"format": "gif"}, 400, "bad_format"),
    ({"model": "nope"}, 404, "unknown_model"),
    ({"stride": "x"}, 400, "bad_parameter"),
])
def test_bad_explain_requests_are_4xx_with_a_reason(client, params, status, code):
    r = client.post("/classify/explain", content=encode(np.zeros((28, 28), np.uint8)), params=params,
                    headers={"Content-Type": "image/png"})
    assert r.status_code == status and r.json()["code"] == code and r.json()["error"], r.text
    r = client.post("/classify/explain", content=b"not an image", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and r.json()["code"] == "not_an_image"


def test_explain_is_documented_and_measured(client, digits_test):
    paths = client.get("/docs.json").json()["paths"]
    assert "/classify/explain" in paths and "/models/{name}/samples" in paths
    names = {p["name"] for p in paths["/classify/explain"]["post"]["parameters"]}
    assert {"method", "target", "patch", "stride", "format", "model"} <= names
    client.post("/classify/explain", content=corner_digit(digits_test)[0], headers={"Content-Type": "image/png"})
    text = client.get("/metrics").text
    assert 'cnnserve_explain_stage_seconds_count{method="occlusion",model="lenet5-digits",stage="inference"}' in text


def test_samples_are_embedded_by_the_export(client):
    samples = client.get("/models/lenet5-digits/samples").json()["samples"]
    assert [s["index"] for s in samples] == list(range(10))
    assert all(s["image"].startswith("data:image/png;base64,") for s in samples)
    assert client.get("/models/resnet18-explain/samples").json()["samples"][0]["image"].startswith("data:image/jpeg")


def random_checkpoint(arch: str, folder: Path, size: int = 32) -> Path:
    from cnnserve.models.checkpoint import save_checkpoint
    from cnnserve.models.registry import build_classifier, spec_for

    spec = spec_for(arch, ("a", "b", "c"), 3, size)
    model = build_classifier(spec)
    path = folder / arch.replace(":", "-") / "model.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"arch": arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(), "metrics": {},
                           "torch_version": str(torch.__version__)})
    return path


@pytest.mark.parametrize("arch", ["alexnet", "vgg11_bn", "googlenet", "densenet121", "mobilenet_v1",
                                  "timm:resnet18", "torchvision:mobilenet_v3_small"])
def test_visualize_every_family_and_library_models(arch, tmp_path):
    from cnnserve.models.visualize import visualize

    ckpt = random_checkpoint(arch, tmp_path)
    image = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    filters, features = visualize(ckpt, image, tmp_path / "out")
    assert Image.open(filters).size[0] > 200 and Image.open(features).size[1] > 300


def test_visualize_command(default_run, shapes_resnet_run, tmp_path):
    """The real command, for the default run (with one of its held-out samples) and a ResNet."""
    sample = tmp_path / "seven.png"
    sample.write_bytes(encode(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((7, 7), np.uint8))))
    proc = run_cli("visualize", default_run / "model.pt", "--image", sample, "--out", tmp_path / "lenet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "lenet" / "filters.png").is_file() and (tmp_path / "lenet" / "features.png").is_file()
    proc = run_cli("visualize", shapes_resnet_run / "model.pt", "--out", tmp_path / "resnet")
    assert proc.returncode == 0 and (tmp_path / "resnet" / "filters.png").is_file()
    assert not (tmp_path / "resnet" / "features.png").exists()  # no --image, no feature maps
    proc = run_cli("visualize", tmp_path / "nothing.pt")
    assert proc.returncode != 0 and "nothing.pt: no such file" in proc.stderr and "Traceback" not in proc.stderr


# -- the demo page in a real browser -------------------------------------------------------------

def chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("chromium-driver")
    if not browser or not driver:
        pytest.skip("chromium and chromium-driver are not installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them where apt can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_demo_page_in_chromium(explain_server, client, digits_test, tmp_path):
    """On /demo: an empty page shows notes, not broken images; upload a held-out digit: the bars appear, the
    top one is /classify's answer, the occlusion heatmap is drawn; a sample is one click away. A refused
    upload clears the previous results. Then the 4-class ResNet (fewer classes than the five bars the page
    asks for: it shows as many bars as there are classes): its sample is classified and explained, with the
    occlusion's progress and expected time shown while it runs. The screenshots are kept in test-artifacts/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    x, y = digits_test
    digit = tmp_path / "digit.png"
    digit.write_bytes(encode(x[7][0]))
    answer = client.post("/classify", content=digit.read_bytes(), headers={"Content-Type": "image/png"}).json()
    want = answer["predictions"][0]["label"]
    driver = chromium()

    def severe():
        return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]

    try:
        driver.get(explain_server.url + "/demo")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples button")) == 10)
        # the empty state: no image without a source is drawn (it showed as broken-image alt text)
        for img in ("input", "heatmap"):
            assert not driver.find_element(By.ID, img).is_displayed()
        notes = [e for e in driver.find_elements(By.CSS_SELECTOR, "figure .empty") if e.is_displayed()]
        assert len(notes) == 2 and "no image yet" in notes[0].text
        driver.find_element(By.ID, "file").send_keys(str(digit))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bars li.bar"))
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars li.bar")
        assert len(bars) == 5 and bars[0].get_attribute("data-label") == want
        assert driver.find_element(By.ID, "ood").get_attribute("data-in-distribution") == \
            str(answer["in_distribution"]).lower()
        wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-drawn") == "true")
        assert driver.execute_script("return document.getElementById('heatmap').naturalWidth") == 224
        # the page counts the occluded copies as the service does: 13 x 13 at 28 px
        assert "169 occluded copies" in driver.find_element(By.ID, "heatmap-caption").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "demo.png"))
        # one click on a sample classifies it too
        sample = driver.find_elements(By.CSS_SELECTOR, "#samples button")[3]
        label = sample.get_attribute("data-label")
        sample.click()
        wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-drawn") == "true"
                   and d.find_elements(By.CSS_SELECTOR, "#bars li.bar"))
        assert driver.find_elements(By.CSS_SELECTOR, "#bars li.bar")[0].get_attribute("data-label") == label
        assert not severe()
        # noise: the page says the image is unlike the training data (its OOD score, not just its bars)
        noise = tmp_path / "noise.png"
        noise.write_bytes(encode(np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)))
        driver.find_element(By.ID, "file").send_keys(str(noise))
        wait.until(lambda d: d.find_element(By.ID, "ood").get_attribute("data-in-distribution") == "false")
        note = driver.find_element(By.ID, "ood")
        assert note.is_displayed() and "unlike the training data" in note.text
        wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-drawn") == "true")
        # a refused upload: the error shows, and the previous image's caption, map and bars are gone
        notes_file = tmp_path / "notes.txt"
        notes_file.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(notes_file))
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
        assert "refused the image" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "heatmap-caption").text == "occlusion map"
        assert not driver.find_elements(By.CSS_SELECTOR, "#bars li.bar")
        assert driver.find_element(By.ID, "heatmap").get_attribute("src") is None
        assert all("status of 400" in e["message"] for e in severe())  # the refused request itself
        # a model with four classes: four bars, a map, and while the map is computed, its progress
        Select(driver.find_element(By.ID, "model")).select_by_value("resnet18-explain")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples button")) == 4)
        assert driver.find_element(By.ID, "status").text == ""  # the last model's error went with it
        driver.execute_script("""window.statuses = [];
            new MutationObserver(() => window.statuses.push(document.getElementById('status').textContent))
              .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});""")
        sample = driver.find_elements(By.CSS_SELECTOR, "#samples button")[2]
        sample.click()
        wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-drawn") == "true")
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars li.bar")
        samples = client.get("/models/resnet18-explain/samples").json()["samples"]
        import base64

        image = base64.b64decode(samples[2]["image"].split(",", 1)[1])
        top = client.post("/classify", params={"model": "resnet18-explain"}, content=image,
                          headers={"Content-Type": "image/jpeg"}).json()["predictions"][0]["label"]
        assert len(bars) == 4 and bars[0].get_attribute("data-label") == top
        caption = driver.find_element(By.ID, "heatmap-caption").text
        assert f'occlusion map for "{top}"' in caption and "225 occluded copies" in caption  # 15 x 15 at 32 px
        statuses = driver.execute_script("return window.statuses")
        assert any("computing the occlusion map: 225 occluded copies of the 32x32 input" in t and " of about " in t
                   for t in statuses), statuses
        driver.save_screenshot(str(ARTIFACTS / "demo-4-classes.png"))
        assert not severe()
    finally:
        driver.quit()
    assert Image.open(ARTIFACTS / "demo.png").size[0] >= 1000


@pytest.mark.parametrize("arch", ["lenet5", "resnet18"])
def test_filters_title_fits_the_picture(arch, tmp_path):
    """filters.png's title lies inside the picture, however few filters make it narrow (LeNet-5's six
    filters gave a figure narrower than its one-line title, cut off at both ends)."""
    import matplotlib.pyplot as plt

    from cnnserve.models.checkpoint import classifier_from_checkpoint, load_checkpoint
    from cnnserve.models.visualize import filters_figure

    model = classifier_from_checkpoint(load_checkpoint(random_checkpoint(arch, tmp_path)))
    fig = filters_figure(model.net, f"{arch} on a data set with a long name")
    try:
        fig.canvas.draw()
        box, page = fig._suptitle.get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
    finally:
        plt.close(fig)
