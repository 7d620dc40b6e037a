"""The web page at ``/`` in a real browser: Debian's chromium driven by Playwright, against the real app under
uvicorn on a loopback port (``service.testing.LiveServer``) with the embedded default models and an API key set.

Checked as a person would use it: the page asks for the key and then works; it loads with no console error,
no failed request and nothing from another origin; a synthetic scene (and the same scene as a TIFF) shows
both captions as the API answered them, exactly as many boxes as the API returned concepts at or above the
slider's score, and the 17 labels with the model's threshold; a text file named .png shows the API's own
error message; a small batch job reaches 100 % and its results are listed with thumbnails and can be
downloaded; the Models view reloads a model with the admin key; the Scenes tab is absent while the server
has no ``/v1/scenes`` (and, once it has, a GeoTIFF goes through it). A screenshot of each view is saved
under the test's temporary output folder (printed with ``-s``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from service.testing import LiveServer, image_bytes, wait_ready

API_KEY = "web-test-api-key"
ADMIN_KEY = "web-test-admin-key"
MAX_BODY = 1_500_000  # small enough for a too-large upload to be cheap
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path:
        return path
    message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def scene_png(scene: str, imgid: int, fmt: str = "PNG") -> bytes:
    from captioning.data.synth.generator import render

    buf = io.BytesIO()
    render(scene, 0, imgid).image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(_env_file=None, api_key=API_KEY, admin_key=ADMIN_KEY, data_dir=tmp_path_factory.mktemp("web-data"),
                        torch_threads=1, max_body_bytes=MAX_BODY)  # the embedded default models (model_store/)
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web-screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


class Watched:
    """A fresh tab (own sessionStorage) that records console errors, failed requests and every URL asked."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.url = url
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.bad_status: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: r.status >= 400 and self.bad_status.append(f"{r.status} {r.url}"))

    def open(self, key: str | None = API_KEY):
        self.page.goto(self.url + "/")
        if key is not None:
            self.page.locator("#key-panel").wait_for(state="visible")
            self.page.fill("#api-key", key)
            self.page.click("#key-form button[type=submit]")
            self.page.locator("#model-list article").first.wait_for(state="attached")
            self.page.locator("#app").wait_for(state="visible")
        return self.page

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser, server):
    watched = Watched(browser, server)
    yield watched
    watched.close()


def give(page, how: str, path: Path) -> None:
    """Hand the page a file as a paste (a ClipboardEvent on the document) or a drop (on the drop zone)."""
    import base64

    page.evaluate("""([how, name, data]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: 'image/png' }));
        if (how === 'paste') document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: transfer }));
        else document.querySelector('#drop').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer }));
    }""", [how, path.name, base64.b64encode(path.read_bytes()).decode()])


def post(url: str, path: str, name: str, data: bytes, kind: str) -> httpx.Response:
    return httpx.post(f"{url}{path}", files={"file": (name, data, kind)}, headers=AUTH, timeout=60)


# ---------------------------------------------------------------------------------------------- tests
def test_page_and_files_need_no_key_and_come_from_the_service(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "api.js", "image.js", "batch.js", "scenes.js", "models.js", "zip.js", "dom.js", "style.css"):
        r = httpx.get(f"{server}/ui/static/{name}")
        assert r.status_code == 200, name
    assert httpx.get(f"{server}/ui/config.json").json()["api_key_required"] is True
    assert httpx.get(f"{server}/v1/models").status_code == 401  # the API itself still needs the key
    assert httpx.post(f"{server}/ui/preview", content=b"x", headers={"Content-Type": "image/png"}).status_code == 401
    assert "http" not in page.text.replace(f"{server}", "").split("<body")[0].replace("http://www.w3.org", "")


def test_the_pages_files_are_package_data():
    """A wheel (the Docker image installs one) carries service/static/, else mount_web refuses to start."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    static = sorted(p.relative_to(root / "service").as_posix() for p in (root / "service" / "static").iterdir())
    missing = [name for name in static if not any(fnmatch.fnmatch(name, g) for g in globs.get("service", []))]
    assert not missing, (f"{missing} would be left out of the wheel: add service = [\"static/*\"] to "
                         "[tool.setuptools.package-data] in pyproject.toml")


def test_page_loads_clean_and_every_view_renders(tab, shots):
    page = tab.open()
    assert page.locator("#key-panel").is_hidden()
    # Every request went to this server (no CDN, no font service), none failed, none answered an error.
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []
    assert all(u.startswith(tab.url) or u.startswith(("data:", "blob:")) for u in tab.requests), tab.requests
    # Labels on every visible control; the tabs are reachable by keyboard.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter((el) => el.type !== 'hidden' && el.labels.length === 0).map((el) => el.id)""")
    assert unlabelled == []
    page.focus("#tab-image")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-batch"
    assert page.locator("#view-batch").is_visible() and page.locator("#view-image").is_hidden()
    # Until the server has /v1/scenes the Scenes tab is absent.
    paths = httpx.get(f"{tab.url}/openapi.json").json()["paths"]
    assert page.locator("#tab-scenes").is_visible() == ("/v1/scenes" in paths)
    page.click("#tab-models")
    served = httpx.get(f"{tab.url}/v1/models", headers=AUTH).json()["models"]
    names = page.locator("#model-list article h3").all_inner_texts()
    assert sorted(names) == sorted(f"{m['name']}@{m['serving_version']}" for m in served)
    page.screenshot(path=shots / "models.png", full_page=True)
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []


def test_api_key_is_asked_for_kept_in_the_tab_and_sent(tab, browser):
    page = tab.open(key=None)
    page.locator("#key-panel").wait_for(state="visible")
    assert page.locator("#app").is_hidden()
    page.fill("#api-key", "not-the-right-key")
    page.click("#key-form button[type=submit]")
    detail = httpx.get(f"{tab.url}/v1/models", headers={"Authorization": "Bearer not-the-right-key"}).json()["detail"]
    page.locator("#key-error", has_text=detail).wait_for()
    assert page.evaluate("sessionStorage.getItem('captioner.apiKey')") is None  # a refused key is not kept
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#app").wait_for(state="visible")
    assert page.evaluate("sessionStorage.getItem('captioner.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    page.reload()  # same tab: the key is kept, no prompt
    page.locator("#app").wait_for(state="visible")
    assert page.locator("#key-panel").is_hidden()
    other = Watched(browser, tab.url)  # another tab (context): asked again
    try:
        other.page.goto(tab.url + "/")
        other.page.locator("#key-panel").wait_for(state="visible")
    finally:
        other.close()


def test_a_scene_shows_both_captions_its_boxes_and_labels(tab, shots, tmp_path):
    png = tmp_path / "harbor.png"
    png.write_bytes(scene_png("harbor", 1))
    tif = tmp_path / "harbor.tif"
    tif.write_bytes(scene_png("harbor", 1, "TIFF"))
    page = tab.open()
    answers: dict[str, list] = {}

    def record(response):
        path = response.url.replace(tab.url, "")
        if path.startswith("/v1/") and response.request.method == "POST" and response.ok:
            answers.setdefault(path, []).append(response.json()["results"][0])

    page.on("response", record)
    page.set_input_files("#image-files", [str(png), str(tif)])
    cards = page.locator("article.image-card")
    assert cards.count() == 2
    png_card, tif_card = cards.nth(0), cards.nth(1)
    for card in (png_card, tif_card):
        for model in ("lightcap", "ucm-captioner"):
            card.locator(f"section.caption[data-model={model}] .caption-text").wait_for()
        card.locator(".bar-row").first.wait_for()
        card.locator(".concept-list").wait_for(state="attached")
    page.wait_for_function("document.querySelectorAll('article.image-card .stage img').length === 2")
    # The TIFF, which chromium cannot show, is shown through the service's preview.
    assert tif_card.locator(".stage img").evaluate("img => img.complete && img.naturalWidth") > 0

    by_file = {}
    for path, results in answers.items():
        for r in results:
            by_file.setdefault(r["filename"], {})[path.split("?")[0] + r["model"]] = r
    shown = {m: png_card.locator(f"section.caption[data-model={m}] .caption-text").inner_text()
             for m in ("lightcap", "ucm-captioner")}
    assert shown == {m: by_file["harbor.png"][f"/v1/caption{m}"]["caption"] for m in shown}
    assert png_card.locator("section.caption .timings").count() == 2

    concepts = by_file["harbor.png"]["/v1/conceptsconcepts"]["concepts"]
    assert concepts, "the default concept extractor finds the harbor's boats"
    boxes = png_card.locator("svg.boxes g.box")
    assert boxes.count() == len(concepts)  # slider at 0: every concept the API returned
    scores = sorted(c["score"] for c in concepts)
    cut = round((scores[0] + scores[-1]) / 2, 2) if len(scores) > 1 else round(scores[0], 2)
    slider = png_card.locator(".concepts input[type=range]")
    slider.evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(cut))
    kept = sum(c["score"] >= cut for c in concepts)
    assert boxes.count() == kept
    assert len(concepts) == 1 or 0 < kept < len(concepts)  # the cut is between the lowest and highest score
    # Hovering a concept highlights its box.
    first = png_card.locator(".concept-list li").first
    first.hover()
    index = first.get_attribute("data-i")
    assert "hot" in png_card.locator(f"svg.boxes g.box[data-i='{index}']").get_attribute("class")

    labels = by_file["harbor.png"]["/v1/labelsucm-classifier"]
    assert png_card.locator(".bar-row").count() == len(labels["labels"]) == 17
    on = png_card.locator(".bar-row.on .bar-name").all_inner_texts()
    assert sorted(on) == sorted(labels["predicted"])
    threshold = png_card.locator(".labels input[type=range]")
    assert float(threshold.input_value()) == pytest.approx(labels["threshold"], abs=0.01)
    threshold.evaluate("el => { el.value = 0; el.dispatchEvent(new Event('input')); }")
    assert png_card.locator(".bar-row.on").count() == 17
    png_card.locator(".labels button", has_text="model's").click()
    assert sorted(png_card.locator(".bar-row.on .bar-name").all_inner_texts()) == sorted(labels["predicted"])
    versions = png_card.locator(".versions").inner_text()
    for r in by_file["harbor.png"].values():
        assert f"{r['model']}@{r['version']}" in versions
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []
    page.screenshot(path=shots / "image.png", full_page=True)
    png_card.screenshot(path=shots / "image-card.png")
    page.set_viewport_size({"width": 375, "height": 800})  # a phone: nothing wider than the screen
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
    page.screenshot(path=shots / "image-375px.png", full_page=True)


def test_a_text_file_named_png_shows_the_apis_error(tab, tmp_path, shots):
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"these are my notes, not a picture\n" * 4)
    expected = post(tab.url, "/v1/caption", "notes.png", fake.read_bytes(), "image/png").json()["detail"]
    assert "notes.png" in expected
    page = tab.open()
    give(page, "paste", fake)  # pasted, as from the clipboard
    card = page.locator("article.image-card")
    line = card.locator(".errors p.error", has_text=expected)
    line.wait_for()
    page.wait_for_function("""() => {
        const parts = document.querySelector('article.image-card .errors strong').textContent;
        return ['caption (lightcap)', 'caption (ucm-captioner)', 'concepts', 'labels'].every((p) => parts.includes(p));
    }""")
    assert line.count() == 1  # one line per distinct message, naming every part that failed with it
    assert {"caption (lightcap)", "caption (ucm-captioner)", "concepts", "labels"} <= set(
        line.locator("strong").inner_text().rstrip(": ").split(", "))
    assert card.locator(".caption-text").count() == 0
    # Too large: the body cap's 413 (answered before the body is read) reaches the page as its problem+json.
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(1000, 700, seed=5))
    assert big.stat().st_size > MAX_BODY
    detail = post(tab.url, "/v1/labels", "big.png", big.read_bytes(), "image/png").json()["detail"]
    expected = detail[detail.index("the cap is"):]  # the browser's multipart body is not byte for byte httpx's
    give(page, "drop", big)  # dropped on the drop zone
    page.locator("article.image-card h2", has_text="big.png").wait_for()
    page.locator("article.image-card .errors p.error", has_text="request body too large").wait_for()
    # each part's answer arrives on its own: wait for the labels part before reading the card
    page.wait_for_function("""() => {
        const errors = [...document.querySelectorAll('article.image-card')].pop().querySelector('.errors');
        return errors && errors.textContent.includes('labels');
    }""")
    shown = page.locator("article.image-card .errors").inner_text()
    assert expected in shown and "labels" in shown, shown
    page.screenshot(path=shots / "error.png", full_page=True)


def test_a_batch_job_reaches_100_percent_and_lists_its_results(tab, tmp_path, shots):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, scene in enumerate(("harbor", "forest", "parkinglot")):
            z.writestr(f"pics/{scene}.png", scene_png(scene, i))
        z.writestr("pics/readme.txt", b"not an image")
    archive = tmp_path / "pics.zip"
    archive.write_bytes(buf.getvalue())
    page = tab.open()
    page.click("#tab-batch")
    page.set_input_files("#batch-files", str(archive))
    page.select_option("#batch-model", "ucm-captioner")
    page.click("#batch-form button[type=submit]")
    page.locator("#batch-status", has_text="succeeded").wait_for()
    assert page.locator("#batch-progress").evaluate("el => el.value") == 1
    assert "4 of 4 (100 %)" in page.locator("#batch-status").inner_text()
    items = page.locator("#batch-results li.result")
    assert items.count() == 4
    assert items.locator(".caption-text").count() == 3
    assert items.filter(has_text="readme.txt").locator("p.error").count() == 1
    page.wait_for_function("[...document.querySelectorAll('#batch-results img.thumb:not([hidden])')]"
                           ".filter((i) => i.complete && i.naturalWidth > 0).length === 3")
    with page.expect_download() as download:
        page.click("#batch-download")
    lines = [json.loads(x) for x in Path(download.value.path()).read_text().splitlines()]
    assert [x["name"] for x in lines] == ["pics/harbor.png", "pics/forest.png", "pics/parkinglot.png", "pics/readme.txt"]
    shown = items.locator(".caption-text").all_inner_texts()
    assert shown == [x["caption"] for x in lines if "caption" in x]
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []
    page.screenshot(path=shots / "batch.png", full_page=True)


def test_a_batch_job_can_be_cancelled(tab, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(200):  # far more than can run between the click on start and the one on cancel
            z.writestr(f"many/{i:03d}.png", image_bytes(64, 64, seed=i))
    archive = tmp_path / "many.zip"
    archive.write_bytes(buf.getvalue())
    page = tab.open()
    page.click("#tab-batch")
    page.set_input_files("#batch-files", str(archive))
    page.select_option("#batch-model", "lightcap")
    page.click("#batch-form button[type=submit]")
    page.locator("#batch-status", has_text="job ").wait_for()
    page.click("#batch-cancel")
    page.locator("#batch-status", has_text="cancelled").wait_for()
    assert page.locator("#batch-cancel").is_disabled()
    job_id = page.locator("#batch-status").inner_text().split()[1].rstrip(":")
    job = httpx.get(f"{tab.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["state"] == "cancelled" and job["done"] < 200
    page.locator("#batch-pager", has_text=f"({job['done'] + job['failed'] + job['refused']} results)").wait_for()
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []


def test_models_view_reloads_with_the_admin_key(tab):
    page = tab.open()
    page.click("#tab-models")
    assert page.locator("#model-list button").count() == 0  # no admin key, no reload button
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#admin-form button[type=submit]")
    card = page.locator("article.model[data-model=ucm-captioner]")
    card.locator("button", has_text="Reload").click()
    card.locator(".reload-result", has_text="unchanged").wait_for()
    assert page.evaluate("sessionStorage.getItem('captioner.adminKey')") == ADMIN_KEY


def geotiff(path: Path) -> Path:
    import numpy as np
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    tiles = [np.asarray(Image.open(io.BytesIO(scene_png(s, i)))) for i, s in enumerate(("harbor", "forest"))]
    array = np.concatenate(tiles, axis=1).transpose(2, 0, 1)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=3,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(500000, 4500000, 0.3, 0.3)) as ds:
        ds.write(array)
    return path


def test_scenes_view_once_the_server_has_scenes(tab, tmp_path, shots):
    paths = httpx.get(f"{tab.url}/openapi.json").json()["paths"]
    if "/v1/scenes" not in paths:
        pytest.skip("the server has no /v1/scenes yet (not in /openapi.json): the Scenes tab is absent, "
                    "which test_page_loads_clean_and_every_view_renders checks")
    scene = geotiff(tmp_path / "scene.tif")
    page = tab.open()
    page.click("#tab-scenes")
    page.set_input_files("#scene-file", str(scene))
    page.click("#scene-form button[type=submit]")
    page.locator("#scene-status", has_text="succeeded").wait_for(timeout=120_000)
    assert page.locator("#scene-progress").evaluate("el => el.value") == 1
    page.wait_for_function("[...document.querySelectorAll('#scene-output img')]"
                           ".filter((i) => i.complete && i.naturalWidth > 0).length === 1")  # the overlay
    page.check("#scene-plain")  # the plain preview instead
    page.wait_for_function("(() => { const i = document.querySelector('#scene-output img');"
                           " return i.alt === 'scene preview' && i.complete && i.naturalWidth > 0; })()")
    with page.expect_download() as download:
        page.click("#scene-download")
    assert json.loads(Path(download.value.path()).read_text())["type"] == "FeatureCollection"
    assert tab.console_errors == [] and tab.failed == [] and tab.bad_status == []
    page.screenshot(path=shots / "scenes.png", full_page=True)
