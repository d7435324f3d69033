"""`cm3leon serve`: streamed partial images, and the web UI driven in headless Chromium as a
person would use it (type a prompt, press Generate, caption an upload, read the errors)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cm3leon.api import CM3Leon
from cm3leon.errors import CM3LeonError
from cm3leon.serve.card import model_card
from cm3leon.serve.stream import GREY, Partial, stream

@pytest.fixture(scope="module")
def model_dir(task_model_dir):
    return task_model_dir


@pytest.fixture(scope="module")
def m(model_dir):
    return CM3Leon.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
    return path


# --- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["cfg", "best_of_n"])
def test_stream_yields_partial_images_then_the_samples_of_the_unstreamed_call(m, method):
    kwargs = dict(n=2, method=method, num_candidates=2, seed=3)
    plain = m.sample_images("a red circle", **kwargs)
    items = list(stream(m, lambda on_step: m.sample_images("a red circle", on_step=on_step, **kwargs), updates=4))
    partials, final = items[:-1], items[-1]
    h, w = m.image_tokenizer.config.grid
    batches = 1 if method == "cfg" else 2  # best-of-N: a CFG batch, then a CD-K batch
    assert all(isinstance(p, Partial) for p in partials)
    assert [p.rows for p in partials] == list(range(1, h + 1)) * batches
    assert [p.batch for p in partials] == [b for b in range(1, batches + 1) for _ in range(h)]
    assert partials[-1].tokens == 2 * m.tokens_per_image
    assert [s.codes for s in final] == [s.codes for s in plain]  # the hook changes no sample
    first = np.asarray(partials[0].images[0])
    assert partials[0].images[0].size == (m.resolution, m.resolution)
    assert (first[m.resolution // h:] == GREY).all()  # rows not drawn yet are grey
    if method == "cfg":  # the last partial is the final image
        assert [np.asarray(i).tolist() for i in partials[-1].images] == [np.asarray(s.image).tolist() for s in plain]


def test_closing_the_stream_stops_the_generation_and_frees_the_model(m):
    steps, go = [], threading.Event()

    def slow(on_step):
        def hook(n, out):
            steps.append(n)
            if n == m.image_tokenizer.config.grid[1] + 1:
                go.wait(10)  # hold the worker until the consumer has closed the stream
            on_step(n, out)
        return m.sample_images("a red circle", seed=0, on_step=hook)

    it = stream(m, slow)
    assert isinstance(next(it), Partial)
    threading.Timer(0.2, go.set).start()
    it.close()  # what Gradio does when the page goes away
    assert steps[-1] < m.tokens_per_image
    again = m.sample_images("a red circle", seed=0)  # the model is free and unchanged
    assert again[0].codes == m.sample_images("a red circle", seed=0)[0].codes


def test_stream_raises_the_calls_errors(m):
    with pytest.raises(CM3LeonError, match="prompt is empty"):
        list(stream(m, lambda on_step: m.sample_images("", on_step=on_step)))


def test_model_card_shows_sizes_training_tokens_and_metrics(m, model_dir, tmp_path):
    d = tmp_path / "run" / "sft"
    shutil.copytree(model_dir, d)
    (d / "train_summary.json").write_text(json.dumps({"stage": "sft", "init": "runs/x/pretrain", "tokens_seen": 1000,
                                                      "steps": 10}))
    (d.parent / "pretrain").mkdir()
    (d.parent / "pretrain" / "train_summary.json").write_text(json.dumps({"tokens_seen": 5000, "steps": 50}))
    (d.parent / "metrics.json").write_text(json.dumps({"quality_bar": [
        {"criterion": "captions right", "figure": "91.0%", "bar": ">= 90%", "n": 100, "verdict": "met"}],
        "eval_sft": {"clip": {"value": 0.84}}}))
    card = model_card(CM3Leon.from_pretrained(d))
    for text in ("parameters", "16 codes", "1,000 tokens, 10 steps", "5,000 tokens, 50 steps", "captions right",
                 "91.0%", "clip.value = 0.84", "no retriever/ and index/"):
        assert text in card


def test_the_text_to_image_tab_starts_with_the_models_recommended_method():
    pytest.importorskip("gradio")
    from cm3leon.decode.config import DecodingConfig
    from cm3leon.serve.app import MAX_IMAGES, default_method

    assert default_method(DecodingConfig()) == ("CFG", 1)  # no decoding.json: the paper's TopP + CFG
    assert default_method(DecodingConfig(method="best_of_n", num_candidates=4)) == ("best-of-N", 4)
    assert default_method(DecodingConfig(method="best_of_n", num_candidates=100)) == ("best-of-N", MAX_IMAGES)
    assert default_method(DecodingConfig(method="cdk", num_candidates=4)) == ("CD-K", 1)


def test_the_edit_tab_draws_and_ranks_the_models_edit_candidates(model_dir, picture, monkeypatch):
    pytest.importorskip("gradio")
    from cm3leon.serve.app import Handlers

    tuned = CM3Leon.from_pretrained(model_dir)
    tuned.decoding = tuned.decoding.replace(edit_candidates=3)
    seen = []
    real = tuned._rank_edits
    monkeypatch.setattr(tuned, "_rank_edits", lambda cond, ss: seen.append(len(ss)) or real(cond, ss))
    *_, (before, after, status) = list(Handlers(tuned).edit(str(picture), "make it blue", 1.0, 1.5, 1.0, 0.9, 0))
    assert seen == [3] and isinstance(after, Image.Image) and "ranked by likelihood" in status


def test_serve_cli_reports_a_bad_model_dir_without_a_traceback(tmp_path, capsys):
    pytest.importorskip("gradio")
    from cm3leon.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "7860"]) == 2
    assert "model directory not found" in capsys.readouterr().err


# --- the web UI in a real browser ----------------------------------------------------------

def _fail_or_skip(reason: str):
    """In CI (CI=true) a browser that cannot start fails the test; elsewhere it is skipped."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + " (make test installs the ui extra, Playwright and Debian's chromium)")
    pytest.skip(reason)


def _chromium() -> str:
    path = os.environ.get("CM3LEON_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        _fail_or_skip("no chromium executable on PATH (set CM3LEON_CHROMIUM)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        _fail_or_skip(f"gradio is not installed ({e})")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cm3leon.cli", "serve", "--model", str(model_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"cm3leon serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"cm3leon serve did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser_page(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _fail_or_skip(f"playwright is not installed ({e})")
    exe = _chromium()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001 - any launch failure
            _fail_or_skip(f"chromium ({exe}) did not start: {e}")
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.external = []  # requests leaving this machine: there must be none
        local = (server, "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(local) else page.external.append(r.url))
        page.goto(server)
        yield page
        browser.close()


def test_browser_text_to_image_draws_an_image_of_the_models_size(browser_page, m):
    page = browser_page
    page.get_by_role("tab", name="Text → image").click()
    page.locator("#t2i-prompt textarea").fill("a red circle")
    page.evaluate("""() => {  // every status the page shows while the image is drawn
        const el = document.querySelector('#t2i-status');
        window.statuses = [];
        new MutationObserver(() => window.statuses.push(el.innerText)).observe(
            el, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#t2i-go").click()
    page.locator("#t2i-status").get_by_text("tokens/s").wait_for()
    assert any(t.startswith("drawing image") for t in page.evaluate("window.statuses"))  # streamed rows
    # the picture the page shows once drawing is done, fetched from its address (not from the <img>'s
    # own loading, which the browser may defer while the element is off screen)
    src = page.wait_for_function("() => { const i = document.querySelector('#t2i-image img');"
                                 " return i && i.getAttribute('src'); }").json_value()
    if src.startswith("data:"):
        import base64

        body = base64.b64decode(src.split(",", 1)[1])
    else:
        body = page.request.get(urllib.parse.urljoin(page.url, src)).body()
    assert list(Image.open(io.BytesIO(body)).size) == [m.resolution, m.resolution]
    assert "1 image(s)" in page.locator("#t2i-status").inner_text()


def test_browser_caption_reads_the_models_text_back(browser_page, m, picture):
    page = browser_page
    page.get_by_role("tab", name="Image → text").click()
    page.locator("#caption-image input[type=file]").set_input_files(str(picture))
    page.locator("#caption-image img").wait_for()  # the upload is done
    page.locator("#caption-go").click()
    page.locator("#caption-status").get_by_text("captioned in").wait_for()
    shown = page.locator("#caption-text textarea").input_value()
    expected = m.image_to_text(picture)
    assert expected.strip()
    printable = lambda s: "".join(ch for ch in s if ch.isprintable()).strip()  # noqa: E731
    assert printable(shown) == printable(expected)


def test_browser_bad_inputs_show_errors_naming_the_field(browser_page, tmp_path):
    page = browser_page
    page.get_by_role("tab", name="Text → image").click()
    page.locator("#t2i-prompt textarea").fill("a red circle " * 30)
    page.locator("#t2i-go").click()
    page.get_by_text("prompt is too long").wait_for()
    page.get_by_role("tab", name="Image → text").click()
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    page.locator("#caption-image input[type=file]").set_input_files(str(fake))
    page.locator("#caption-go").click()
    page.get_by_text("image: not an image").wait_for()


def test_browser_page_fetches_nothing_from_the_network(browser_page):
    page = browser_page
    page.get_by_role("tab", name="Model card").click()
    page.get_by_role("cell", name="Transformer").wait_for()
    assert page.external == []
