"""The Gradio app of `cm3leon serve`: one tab per task over one model in memory.

Every request is checked before any work starts (the API's own checks, plus the bounds below)
and a bad one is an error shown in the page. All model work shares one queue slot
(`concurrency_id="model"`, limit 1) and at most `QUEUE_SIZE` requests wait; more get Gradio's
"This application is currently busy" message. Images are streamed while they are drawn
(`cm3leon.serve.stream`); a closed page stops its generation at the next token. Nothing is
fetched from the network: analytics are off and the page uses Gradio's bundled assets only.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home

from cm3leon.api import MAX_SEED, CM3Leon, prepare_image  # noqa: E402
from cm3leon.decode.config import IMAGE_METHODS, DecodingConfig  # noqa: E402
from cm3leon.errors import CM3LeonError, require  # noqa: E402
from cm3leon.serve.card import model_card  # noqa: E402
from cm3leon.serve.stream import Partial, stream  # noqa: E402

gr = require("gradio", "ui", "cm3leon serve")

MAX_TEXT_CHARS = 300  # prompt, question, instruction
MAX_IMAGES = 16  # N: images per request, or best-of-N candidates
MAX_DOCS = 8  # retrieved documents
MAX_UPLOAD = "8mb"  # uploaded file size; the image loader also caps its pixels
QUEUE_SIZE = 8  # requests waiting for the model
SEED_LIMIT = min(MAX_SEED, 2**31 - 1)  # what a browser number field holds exactly
METHODS = {"TopP": "topp", "CFG": "cfg", "CD-K": "cdk", "best-of-N": "best_of_n"}
assert set(METHODS.values()) == set(IMAGE_METHODS)
# The controls each method uses (best-of-N draws half its candidates with CFG, half with CD-K).
CONTROLS = {"topp": {"temperature", "top_p"}, "cfg": {"cfg_scale", "temperature", "top_p"},
            "cdk": {"cdk_alpha", "cdk_k", "temperature"},
            "best_of_n": {"cfg_scale", "cdk_alpha", "cdk_k", "temperature", "top_p"}}
CSS = """
.pixels img { image-rendering: pixelated; width: 100% !important; height: 100% !important; object-fit: contain; }
.pixels .thumbnail-item img, .pixels .gallery img { image-rendering: pixelated; }
"""


def _page_error(message: str):
    """An error shown in the page; bad input is not a server fault, so no traceback in the log."""
    return gr.Error(message, title="Bad input", print_exception=False)


def _in_page(fn):
    """Bad input (`CM3LeonError`) becomes an error shown in the page; works for generators."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except CM3LeonError as e:
                raise _page_error(str(e)) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CM3LeonError as e:
            raise _page_error(str(e)) from None
    return call


def _text(s, field: str) -> str:
    if not isinstance(s, str) or not s.strip():
        raise CM3LeonError(f"{field} is empty: type some text")
    if len(s) > MAX_TEXT_CHARS:
        raise CM3LeonError(f"{field} is too long: {len(s)} characters (at most {MAX_TEXT_CHARS})")
    return s.strip()


def _int(x, field: str, lo: int, hi: int) -> int:
    if x is None or isinstance(x, bool) or not float(x).is_integer() or not lo <= x <= hi:
        raise CM3LeonError(f"{field} must be a whole number in [{lo}, {hi}], got {x!r}")
    return int(x)


def _image_input(**kwargs) -> "gr.Image":
    """An image input whose unreadable uploads are an error naming the field, not a crash.
    (Wraps the instance's preprocess: a subclass would make Gradio write a .pyi stub beside
    this file.)"""
    component = gr.Image(**kwargs)
    plain = component.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image"
            raise _page_error(f"{component.label or 'image'}: not an image ({type(e).__name__})") from None

    component.preprocess = preprocess
    return component


class Handlers:
    """What each button does, on one model. `lock` keeps the model to one request at a time
    even outside Gradio's queue."""

    def __init__(self, m: CM3Leon):
        self.m = m
        self.lock = threading.Lock()

    def _locked(self, call):
        def run(on_step):
            with self.lock:
                return call(on_step=on_step)
        return run

    def _image(self, path, field: str = "image"):
        """An uploaded file -> the square image the model sees (checked by the API's loader)."""
        if path is None:
            raise CM3LeonError(f"{field}: upload an image first")
        try:
            return prepare_image(path, self.m.resolution)
        except CM3LeonError as e:
            raise CM3LeonError(f"{field}: {str(e).replace(str(path), Path(path).name)}") from None

    def _stream_images(self, call, what: str):
        """Stream `call(on_step=...)` (an API call returning ImageSamples): yields (image being
        drawn, None, status) while it runs, then (samples, seconds)."""
        h = self.m.image_tokenizer.config.grid[0]
        t0 = time.perf_counter()
        for item in stream(self.m, self._locked(call)):
            if isinstance(item, Partial):
                yield item.images[0], None, (f"drawing {what}: batch {item.batch}, row {item.rows}/{h}, "
                                             f"{item.tokens:,} tokens, {time.perf_counter() - t0:.1f} s")
            else:
                yield None, item, time.perf_counter() - t0

    def _done(self, samples, seconds: float) -> str:
        tokens = len(samples) * self.m.tokens_per_image
        s = samples[0]
        ranked = f" · ranked by {s.scorer} score" if s.scorer else ""
        docs = f" · {len(s.retrieved)} retrieved document(s) in the prompt" if s.retrieved else ""
        return (f"{len(samples)} image(s) · {tokens:,} tokens in {seconds:.2f} s · "
                f"{tokens / max(seconds, 1e-9):,.0f} tokens/s · seed {s.seed}{ranked}{docs}")

    @staticmethod
    def _caption(i: int, s) -> str:
        return f"#{i + 1} {s.method}" + (f" · {s.score:.3f}" if s.score is not None else "")

    @_in_page
    def text_to_image(self, prompt, method, n, cfg_scale, cdk_alpha, cdk_k, temperature, top_p, seed,
                      num_retrieved=0):
        """-> stream of (image, gallery, status). Retrieved documents only from the Retrieval tab."""
        prompt = _text(prompt, "prompt")
        if method not in METHODS:
            raise CM3LeonError(f"method must be one of {list(METHODS)}, got {method!r}")
        method = METHODS[method]
        n = _int(n, "N", 1, MAX_IMAGES)
        options = dict(method=method, n=n, cfg_scale=cfg_scale, cdk_alpha=cdk_alpha,
                       cdk_k=_int(cdk_k, "CD-K K", 1, self.m.vocab.image_vocab_size), temperature=temperature,
                       top_p=top_p, seed=_int(seed, "seed", 0, SEED_LIMIT), num_retrieved=num_retrieved,
                       num_candidates=n)  # best-of-N: all N candidates come back, ranked
        call = functools.partial(self.m.sample_images, prompt, **options)
        for image, samples, status in self._stream_images(call, "image"):
            if samples is None:
                yield image, gr.skip(), status
            else:
                yield (samples[0].image, [(s.image, self._caption(i, s)) for i, s in enumerate(samples)],
                       self._done(samples, status))

    @_in_page
    def retrieve_and_generate(self, prompt, use_docs, k, cfg_scale, seed):
        """-> stream of (retrieved documents, image, status)."""
        prompt = _text(prompt, "prompt")
        k = _int(k, "k", 1, MAX_DOCS)
        docs = self.m.retrieve(text=prompt, k=k)
        shown = self.m.decode_images([list(d["image_codes"]) for d in docs]) if docs else []
        gallery = [(im, f"{d['score']:.3f} · {d['text']}") for im, d in zip(shown, docs)]
        d = self.m.decoding
        for image, _, status in self.text_to_image(prompt, "CFG", 1, cfg_scale, cdk_alpha=d.cdk_alpha, cdk_k=d.cdk_k,
                                                    temperature=d.temperature, top_p=d.top_p, seed=seed,
                                                    num_retrieved=k if use_docs else 0):
            yield gallery, image, status + ("" if use_docs else " · retrieval off")

    @_in_page
    def caption(self, path):
        t0 = time.perf_counter()
        image = self._image(path)
        with self.lock:
            text = self.m.image_to_text(image)
        return text, f"captioned in {time.perf_counter() - t0:.2f} s"

    @_in_page
    def answer(self, path, question):
        question = _text(question, "question")
        t0 = time.perf_counter()
        image = self._image(path)
        with self.lock:
            text = self.m.answer(image, question)
        return text, f"answered in {time.perf_counter() - t0:.2f} s"

    @_in_page
    def edit(self, path, instruction, image_guidance, text_guidance, temperature, top_p, seed):
        """-> stream of (before, after, status)."""
        instruction = _text(instruction, "instruction")
        before = self._image(path)
        # edit_samples draws the model's decoding.json edit_candidates and keeps the likeliest
        call = functools.partial(self.m.edit_samples, before, instruction, image_guidance=image_guidance,
                                 text_guidance=text_guidance, temperature=temperature, top_p=top_p,
                                 seed=_int(seed, "seed", 0, SEED_LIMIT))
        for image, samples, status in self._stream_images(call, "edit"):
            if samples is None:
                yield before, image, status
            else:
                yield before, samples[0].image, self._done(samples, status)


def _method_controls(method: str):
    used = CONTROLS[METHODS[method]]
    return [gr.update(visible=name in used) for name in ("cfg_scale", "cdk_alpha", "cdk_k", "top_p")]


def default_method(d: DecodingConfig) -> tuple[str, int]:
    """The text->image tab's starting method (its label) and N: the model's decoding.json
    method, and for best-of-N its number of candidates (at most MAX_IMAGES)."""
    label = next(k for k, v in METHODS.items() if v == d.method)
    return label, min(d.num_candidates, MAX_IMAGES) if d.method == "best_of_n" else 1


def build_app(m: CM3Leon) -> "gr.Blocks":
    h = Handlers(m)
    model = dict(concurrency_id="model", concurrency_limit=1)  # one model: one request at a time
    seed = dict(label="seed", value=0, precision=0, minimum=0, maximum=SEED_LIMIT)
    image_out = dict(type="pil", format="png", height=320, elem_classes="pixels", interactive=False)
    image_in = dict(type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png", height=320,
                    elem_classes="pixels")
    # delete_cache: uploads and drawn images older than an hour are removed every 10 minutes
    with gr.Blocks(title="CM3Leon", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## CM3Leon · `{m.path}`\nOne decoder-only transformer over text and image tokens: "
                    "text → image, retrieval, captions and answers, edits.")
        with gr.Tab("Text → image", id="t2i"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", placeholder="a red circle", max_lines=3,
                                        max_length=MAX_TEXT_CHARS + 1, elem_id="t2i-prompt")
                    start, start_n = default_method(m.decoding)  # what the model's decoding.json recommends
                    used = CONTROLS[METHODS[start]]
                    method = gr.Radio(list(METHODS), value=start, label="decoding method")
                    n = gr.Slider(1, MAX_IMAGES, value=start_n, step=1, label="N (images; best-of-N: candidates)")
                    cfg_scale = gr.Slider(0, 10, value=m.decoding.cfg_scale, step=0.1, label="CFG scale α",
                                          visible="cfg_scale" in used)
                    cdk_alpha = gr.Slider(0.01, 1, value=m.decoding.cdk_alpha, step=0.01, label="CD-K α",
                                          visible="cdk_alpha" in used)
                    cdk_k = gr.Slider(1, 64, value=m.decoding.cdk_k, step=1, label="CD-K K", visible="cdk_k" in used)
                    temperature = gr.Slider(0, 2, value=m.decoding.temperature, step=0.05,
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=m.decoding.top_p or 1.0, step=0.05, label="top-p",
                                      visible="top_p" in used)
                    t2i_seed = gr.Number(**seed)
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-go")
                with gr.Column():
                    t2i_image = gr.Image(label="image", elem_id="t2i-image", **image_out)
                    t2i_status = gr.Markdown(elem_id="t2i-status")
                    gallery = gr.Gallery(label="all images (best-of-N: ranked by re-rank score)", columns=4,
                                         height=300, format="png", elem_classes="pixels", elem_id="t2i-gallery")
            method.change(_method_controls, method, [cfg_scale, cdk_alpha, cdk_k, top_p], queue=False)
            go.click(h.text_to_image, [prompt, method, n, cfg_scale, cdk_alpha, cdk_k, temperature, top_p, t2i_seed],
                     [t2i_image, gallery, t2i_status], **model)

        with gr.Tab("Retrieval", id="retrieval"):
            if m.retrieval is None:
                gr.Markdown("This model directory has no retrieval index (`retriever/` and `index/`), so "
                            "generations are not conditioned on retrieved documents.", elem_id="no-retrieval")
            else:
                with gr.Row():
                    with gr.Column():
                        r_prompt = gr.Textbox(label="prompt", max_lines=3, max_length=MAX_TEXT_CHARS + 1)
                        use_docs = gr.Checkbox(value=True, label="condition the generation on the retrieved documents")
                        k = gr.Slider(1, MAX_DOCS, value=DecodingConfig.num_retrieved, step=1,
                                      label="k (documents)")
                        r_cfg = gr.Slider(0, 10, value=m.decoding.cfg_scale, step=0.1, label="CFG scale α")
                        r_seed = gr.Number(**seed)
                        r_go = gr.Button("Retrieve and generate", variant="primary")
                    with gr.Column():
                        docs = gr.Gallery(label="retrieved documents (relevance · caption)", columns=4,
                                          format="png", elem_classes="pixels")
                        r_image = gr.Image(label="image", **image_out)
                        r_status = gr.Markdown()
                r_go.click(h.retrieve_and_generate, [r_prompt, use_docs, k, r_cfg, r_seed], [docs, r_image, r_status],
                           **model)

        with gr.Tab("Image → text", id="i2t"):
            with gr.Row():
                with gr.Column():
                    c_image = _image_input(label="image", elem_id="caption-image", **image_in)
                    c_pick = gr.Button("Use the last generated image", size="sm")
                    c_go = gr.Button("Caption", variant="primary", elem_id="caption-go")
                    question = gr.Textbox(label="question", placeholder="what colour is the shape?",
                                          max_length=MAX_TEXT_CHARS + 1)
                    q_go = gr.Button("Answer", variant="primary")
                with gr.Column():
                    caption = gr.Textbox(label="caption", elem_id="caption-text", interactive=False)
                    answer = gr.Textbox(label="answer", interactive=False)
                    c_status = gr.Markdown(elem_id="caption-status")
            c_pick.click(lambda x: x, t2i_image, c_image, queue=False)
            c_go.click(h.caption, c_image, [caption, c_status], **model)
            q_go.click(h.answer, [c_image, question], [answer, c_status], **model)

        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    e_image = _image_input(label="image to edit", **image_in)
                    e_pick = gr.Button("Use the last generated image", size="sm")
                    instruction = gr.Textbox(label="instruction", placeholder="make it blue",
                                             max_length=MAX_TEXT_CHARS + 1)
                    image_guidance = gr.Slider(0, 10, value=m.decoding.image_guidance, step=0.1, label="image guidance")
                    text_guidance = gr.Slider(0, 20, value=m.decoding.text_guidance, step=0.1, label="text guidance")
                    e_temperature = gr.Slider(0, 2, value=m.decoding.temperature, step=0.05,
                                            label="temperature (0 = greedy)")
                    e_top_p = gr.Slider(0.05, 1, value=m.decoding.top_p or 1.0, step=0.05, label="top-p")
                    e_seed = gr.Number(**seed)
                    e_go = gr.Button("Edit", variant="primary")
                with gr.Column():
                    with gr.Row():
                        before = gr.Image(label="before (as the model sees it)", **image_out)
                        after = gr.Image(label="after", **image_out)
                    e_status = gr.Markdown()
            e_pick.click(lambda x: x, t2i_image, e_image, queue=False)
            e_go.click(h.edit, [e_image, instruction, image_guidance, text_guidance, e_temperature, e_top_p, e_seed],
                       [before, after, e_status], **model)

        with gr.Tab("Model card", id="card"):
            gr.Markdown(model_card(m))
    return app


def serve(model_dir, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", dtype=None,
          block: bool = True):
    """Load the model once and serve the app until interrupted (block=False: return the app)."""
    if not 1 <= port <= 65535:
        raise CM3LeonError(f"--port must be in [1, 65535], got {port}")
    m = CM3Leon.from_pretrained(model_dir, device=device, dtype=dtype)
    app = build_app(m).queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, show_error=True, ssr_mode=False,
               pwa=False, mcp_server=False, enable_monitoring=False, footer_links=["api", "settings"],
               prevent_thread_lock=not block, theme=gr.themes.Default(), css=CSS)
    return app
