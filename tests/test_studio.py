"""The studio, the guardrails and provenance against real `genlab serve` processes on loopback.

- The prompt filter refuses image, edit, job, completion and chat requests with a 400 naming the rule.
- The concept checker ("red star") on real `shapes` renders: a tiny CLIP trained in a fixture on single-object
  renders, its threshold set from the cosines it measures on its training renders; held-out renders go through
  the server (edits at strength 0 return their input, so the checked output is the render itself) and each verdict
  must equal the checker's offline; blocked images come back black and flagged. Its false positive and false
  negative rates on held-out renders are printed and bounded (marked slow: it trains the CLIP).
- Provenance: a served PNG's parameters regenerate the same image, and `genlab data info` names its origin.
- The gallery and queue endpoints; then the studio in Debian's chromium driven by Playwright: generate and see the
  progress bar, preview and seed; cancel; the gallery's reuse and delete; a filtered prompt refused with its rule.
  Screenshots go to $GENLAB_TEST_ARTIFACTS (or the test's temporary folder).
"""

from __future__ import annotations

import base64
import io
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve import KEY, Server, make_models, png_array  # noqa: E402

from genlab.cli import main  # noqa: E402
from genlab.data.images import from_uint8  # noqa: E402
from genlab.data.shapes import place, render_scene  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 16  # renders and models are 16x16
COLORS, SHAPES = ("red", "blue", "green"), ("star", "circle", "square")
CONCEPT = "a red star"
CLIP_STEPS = 150
RULES = "# the shapes we refuse to draw\nred star\n"


def renders(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n single-object shapes scenes (every color x shape in turn, random place and size), (n, H, W, 3) uint8."""
    rng = random.Random(seed)
    images, captions = [], []
    for i in range(n):
        color, shape = COLORS[i % 3], SHAPES[(i // 3) % 3]
        images.append(render_scene(place([(color, shape)], rng), SIDE))
        captions.append(f"a {color} {shape}")
    return np.stack(images), captions


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP trained for CLIP_STEPS steps on 360 renders; the concept's threshold is the midpoint of the mean
    cosines of its training renders that show a red star and of those that do not."""
    from genlab.data.base import DatasetInfo, ImageDataset
    from genlab.models.clip import CLIP, CLIPConfig
    from genlab.serve.safety import Concept, ConceptChecker

    root = tmp_path_factory.mktemp("guard-clip")
    images, captions = renders(360, 0)
    info = DatasetInfo(name="shapes-objects", kind="image", size=len(images), license="generated",
                       attribution="test renders", channels=3, image_size=SIDE)
    ds = ImageDataset(images, info, captions=captions)
    torch.manual_seed(0)
    cfg = CLIPConfig(image_tower="vit", patch_size=4, vision_width=32, vision_layers=1, vision_heads=2, vocab=300,
                     context_length=8, text_width=32, text_layers=1, text_heads=2, embed_dim=32)
    model = CLIP.build(cfg, ds)
    data = model.prepare_data(ds)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(CLIP_STEPS):
        loss = model.training_losses(data.get_batch(torch.randint(0, len(data), (32,), generator=g)),
                                     gather=False)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root / "clip")
    cos = ConceptChecker(model, [Concept(CONCEPT, 0.0)]).cosines(from_uint8(images))[:, 0]
    positive = torch.tensor([c == CONCEPT for c in captions])
    threshold = float((cos[positive].mean() + cos[~positive].mean()) / 2)
    (root / "concepts.txt").write_text(f"# measured on the training renders\n{CONCEPT} = {threshold:.4f}\n")
    return root / "clip", root / "concepts.txt"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """test_serve's models, test_serve_text's GPT (`gpt`) and captioner (`cap`), and `canvas`, an untrained
    3-channel 16x16 DDPM for edits (strength 0 keeps the input)."""
    from test_serve_text import tiny_captioner, trained_gpt

    from genlab.models.diffusion import DiffusionConfig, DiffusionModel

    root = make_models(tmp_path_factory.mktemp("studio-models"))
    trained_gpt().save_pretrained(root / "gpt")
    tiny_captioner().save_pretrained(root / "cap")
    torch.manual_seed(0)
    DiffusionModel(DiffusionConfig(num_classes=0, class_cond=False, image_size=SIDE, channels=3, base_channels=8,
                                   channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=())
                   ).save_pretrained(root / "canvas")
    return root


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    """The server of the default tests: API keys and the prompt filter."""
    root = tmp_path_factory.mktemp("plain")
    (root / "rules.txt").write_text(RULES)
    s = Server(models, root / "data", "--max-steps", "1000", "--prompt-filter", str(root / "rules.txt")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def checked(models, clip_folder, tmp_path_factory):
    """A server with the concept checker (no key)."""
    s = Server(models, tmp_path_factory.mktemp("checked") / "data", "--safety-clip", str(clip_folder[0]),
               "--safety-concepts", str(clip_folder[1]), key=None).start()
    yield s
    s.stop()


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# -- the prompt filter ---------------------------------------------------------------------------------------
def test_prompt_filter_refuses_every_endpoint_naming_the_rule(plain):
    def refused(r: httpx.Response) -> None:
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "prompt filter" in msg and "'red star'" in msg and "line 2" in msg

    with plain.client() as c:
        refused(c.post("/v1/images/generations", json={"model": "t2i", "prompt": "two \uff32\uff25\uff24 stars, "
                                                                                 "a Red-Star"}))
        refused(c.post("/v1/images/generations", json={"model": "t2i", "prompt": "a circle",
                                                       "negative_prompt": "r.e.d s.t.a.r", "guidance_scale": 2.0}))
        refused(c.post("/v1/jobs", json={"kind": "image.generation", "params": {"model": "t2i", "prompt": "REDSTAR"}}))
        refused(c.post("/v1/images/edits", files={"image": ("i.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))},
                       data={"model": "t2i", "prompt": "a red\u200bstar"}))
        refused(c.post("/v1/completions", json={"model": "any", "prompt": ["fine", "a red star"]}))
        refused(c.post("/v1/chat/completions", json={"model": "any", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "draw a RED STAR"}]}]}))
        ok = c.post("/v1/images/generations", json={"model": "t2i", "prompt": "a red circle", "steps": 2})
        assert ok.status_code == 200, ok.text
        other = c.post("/v1/completions", json={"model": "nope", "prompt": "a red circle"})
        assert other.status_code in (400, 404) and "prompt filter" not in other.text


# -- the concept checker ---------------------------------------------------------------------------------------
@pytest.mark.slow  # trains a CLIP (~20 s on a loaded core) and starts a server of its own
def test_checker_blocks_red_stars_on_held_out_renders_through_the_server(checked, clip_folder, capsys):
    from genlab.eval.clip import load_clip
    from genlab.serve.safety import ConceptChecker, parse_concepts

    checker = ConceptChecker(load_clip(str(clip_folder[0])), parse_concepts(clip_folder[1].read_text()))
    images, captions = renders(180, 1)  # held out: other places and sizes than the training renders
    truth = torch.tensor([c == CONCEPT for c in captions])
    offline = torch.tensor([v.blocked for v in checker.check(from_uint8(images))])
    fn = float((~offline[truth]).float().mean())
    fp = float(offline[~truth].float().mean())
    with capsys.disabled():
        print(f"\nconcept checker on {len(images)} held-out renders ({int(truth.sum())} red stars): "
              f"false negatives {fn:.3f}, false positives {fp:.3f}")
    assert fn <= 0.25 and fp <= 0.35  # a 150-step CLIP; chance would be about 0.5 each
    # through the server: six red stars and twelve others; each verdict is the offline one
    pick = [i for i in range(len(images)) if truth[i]][:6] + [i for i in range(len(images)) if not truth[i]][:12]
    with checked.client() as c:
        for i in pick:
            r = c.post("/v1/images/edits", files={"image": ("r.png", png_bytes(images[i]))},
                       data={"model": "canvas", "strength": "0", "seed": "3"})
            assert r.status_code == 200, r.text
            item = r.json()["data"][0]
            got, params = png_array(base64.b64decode(item["b64_json"]))
            assert item["blocked"] == bool(offline[i]) == params["safety"]["blocked"], (i, captions[i])
            if item["blocked"]:
                assert (got == 0).all() and params["safety"]["concept"] == CONCEPT
                assert params["safety"]["score"] > float(checker.thresholds[0])
            else:
                assert np.array_equal(got, images[i]) and params["safety"]["concept"] is None
            job = c.get(f"/v1/jobs/{r.json()['job']}").json()
            assert job["result"]["data"][0]["blocked"] == item["blocked"]
    assert offline[pick].any() and not offline[pick].all()


# -- provenance -------------------------------------------------------------------------------------------------
def test_a_served_png_tells_where_it_came_from_and_regenerates_the_same_image(plain, models, capsys, tmp_path):
    import genlab
    from genlab.serve.provenance import model_hash

    with plain.client() as c:
        r = c.post("/v1/images/generations", json={"model": "tiny", "label": 4, "n": 2, "seed": 77, "steps": 6,
                                                   "sampler": "ddim", "guidance_scale": 1.5})
        assert r.status_code == 200, r.text
        img, params = png_array(base64.b64decode(r.json()["data"][1]["b64_json"]))
        assert params["generator"] == "genlab" and params["genlab_version"] == genlab.__version__
        assert params["model_hash"] == model_hash(models / "tiny") and len(params["model_hash"]) == 16
        assert params["seed"] == 78 and params["label"] == 4 and params["steps"] == 6 and params["cfg"] == 1.5
        again = c.post("/v1/images/generations", json={
            "model": params["model"], "label": params["label"], "seed": params["seed"], "steps": params["steps"],
            "sampler": params["sampler"], "guidance_scale": params["cfg"]})
        assert np.array_equal(png_array(base64.b64decode(again.json()["data"][0]["b64_json"]))[0], img)
    path = tmp_path / "served.png"
    path.write_bytes(base64.b64decode(r.json()["data"][1]["b64_json"]))
    capsys.readouterr()
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"genlab {genlab.__version__} with model tiny (folder hash {params['model_hash']}), seed 78" in out
    assert '  sampler: "ddim"' in out
    assert main(["data", "info", str(tmp_path / "missing.png")]) == 2
    (tmp_path / "bare.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    assert main(["data", "info", str(tmp_path / "bare.png")]) == 2
    assert "no genlab parameters" in capsys.readouterr().err


# -- the gallery and queue endpoints -----------------------------------------------------------------------------
def test_gallery_lists_newest_first_in_pages_and_deletes(plain):
    with plain.client() as c:
        ids = []
        for seed in (1, 2, 3):
            ids.append(c.post("/v1/images/generations", json={"model": "tiny", "label": 1, "seed": seed,
                                                              "steps": 2}).json()["data"][0]["id"])
        page = c.get("/v1/outputs", params={"limit": 2}).json()
        assert [o["id"] for o in page["data"]] == [ids[2], ids[1]] and page["total"] >= 3
        assert page["data"][0]["seed"] == 3 and page["data"][0]["params"]["label"] == 1
        nxt = c.get("/v1/outputs", params={"limit": 2, "offset": 1}).json()
        assert nxt["data"][0]["id"] == ids[1]
        assert c.delete(f"/v1/outputs/{ids[1]}").json()["deleted"] is True
        assert c.get(f"/v1/outputs/{ids[1]}").status_code == 404
        assert c.delete(f"/v1/outputs/{ids[1]}").status_code == 404
        assert ids[1] not in [o["id"] for o in c.get("/v1/outputs", params={"limit": 100}).json()["data"]]
        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
            assert c.get("/v1/outputs", params=bad).status_code == 400
        assert c.get("/v1/queue").json()["object"] == "list"
        assert "samplers" in c.get("/v1/studio/options").json()
    assert httpx.get(plain.url + "/").status_code == 200  # the page itself needs no key
    assert httpx.get(plain.url + "/studio/studio.js").status_code == 200
    assert httpx.get(plain.url + "/v1/outputs").status_code == 401  # the data does


# -- the studio in a browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: install Debian's chromium to run the studio's browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("GENLAB_TEST_ARTIFACTS") or tmp_path_factory.mktemp("studio-shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def open_studio(page, server, key: str | None) -> None:
    page.goto(server.url + "/")
    if key:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model option[value=tiny]", state="attached")


def test_studio_generates_with_progress_preview_and_seed_then_reuses_and_deletes(page, plain, shots):
    open_studio(page, plain, KEY)
    page.select_option("#model", "tiny")
    assert page.is_hidden("#prompt-row") and page.is_visible("#label-row")
    page.fill("#label", "3")
    page.fill("#steps", "100")
    page.fill("#seed", "4242")
    page.fill("#count", "2")
    page.evaluate("""() => { window.widths = [];
        new MutationObserver(() => window.widths.push(document.getElementById('progress-bar').style.width))
            .observe(document.getElementById('progress-bar'), {attributes: true}); }""")
    page.click("#generate")
    page.wait_for_selector("#results .card >> nth=1")
    page.screenshot(path=str(shots / "1-generated.png"))
    assert page.inner_text("#results .card >> nth=0").startswith("seed 4242")
    assert "seed 4243" in page.inner_text("#results .card >> nth=1")
    widths = [float(w.rstrip("%")) for w in page.evaluate("window.widths") if w]
    assert widths[-1] == 100 and any(0 < w < 100 for w in widths), widths
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    page.wait_for_function("document.querySelector('#results .card img').naturalWidth === 16")
    # the gallery: newest first, reuse fills the form, delete removes
    page.wait_for_selector("#gallery .card")
    assert page.inner_text("#gallery .card >> nth=0").startswith("seed 4243")
    page.fill("#seed", "")
    page.click("#gallery .card >> nth=0 >> button.reuse")
    assert page.input_value("#seed") == "4243" and page.input_value("#label") == "3"
    before = page.inner_text("#gallery-page")
    gone = page.get_attribute("#gallery .card >> nth=0", "data-id")
    page.click("#gallery .card >> nth=0 >> button.delete")
    page.wait_for_function(f"!document.querySelector('#gallery .card[data-id=\"{gone}\"]')")
    page.screenshot(path=str(shots / "2-gallery-after-delete.png"))
    assert page.inner_text("#gallery-page") != before


def test_studio_cancels_a_running_job(page, plain, shots):
    open_studio(page, plain, KEY)
    page.select_option("#model", "tiny")
    page.fill("#label", "5")
    page.fill("#steps", "1000")
    page.fill("#count", "8")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('running')")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled')")
    page.screenshot(path=str(shots / "3-cancelled.png"))
    assert page.is_enabled("#generate")
    with plain.client() as c:
        deadline = time.monotonic() + 30
        while c.get("/v1/queue").json()["data"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/v1/queue").json()["data"] == []


def test_studio_shows_the_filters_refusal(page, plain, shots):
    open_studio(page, plain, KEY)
    page.select_option("#model", "t2i")
    assert page.is_visible("#prompt-row")
    page.fill("#prompt", "a big ＲＥＤ star")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    page.screenshot(path=str(shots / "4-refused.png"))
    text = page.inner_text("#error")
    assert "prompt filter" in text and "'red star'" in text


def test_studio_without_a_key_says_so(page, plain):
    page.goto(plain.url + "/")
    page.evaluate("localStorage.clear()")
    page.goto(plain.url + "/")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")


def test_studio_inpaints_a_painted_mask(page, plain, shots, tmp_path):
    images, _ = renders(1, 5)
    (tmp_path / "scene.png").write_bytes(png_bytes(images[0]))
    open_studio(page, plain, KEY)
    page.select_option("#model", "canvas")
    assert page.is_visible("#edit-box") and page.is_hidden("#prompt-row")
    page.set_input_files("#edit-image", str(tmp_path / "scene.png"))
    page.wait_for_function("document.getElementById('mask-canvas').width === 16")
    page.fill("#brush", "64")
    page.dispatch_event("#strength", "input")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 8, box["y"] + 8)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.fill("#steps", "8")
    page.fill("#seed", "9")
    page.click("#generate")
    page.wait_for_selector("#results .card")
    page.screenshot(path=str(shots / "5-inpainted.png"))
    with plain.client() as c:
        newest = c.get("/v1/outputs", params={"limit": 1}).json()["data"][0]
        job = c.get(f"/v1/jobs/{newest['job']}").json()
    p = newest["params"]
    assert p["model"] == "canvas" and p["edit"] is True and p["mask"] is True and p["seed"] == 9
    assert p["strength"] == 0.75 and page.inner_text("#results .card").startswith("seed 9")
    # the mask the server received (white = draw anew) is the stroke painted from the top-left corner
    from PIL import Image

    mask = np.asarray(Image.open(plain.data / "inputs" / f"{job['params']['mask']}.png"))
    assert mask.shape[:2] == (16, 16) and mask[0, 0] == 255 and mask[15, 15] == 0 and mask[0, 15] == 0
    assert mask[5, 5] == 255 and 8 < (mask > 127).sum() < 128


def test_studio_streams_a_completion_and_a_chat(page, plain, shots):
    open_studio(page, plain, KEY)
    page.click("button[data-tab=text]")
    page.select_option("#text-model", "gpt")
    page.fill("#max-tokens", "12")
    page.fill("#completion-prompt", "the")
    page.click("#complete")
    page.wait_for_function("document.getElementById('completion-out').textContent.length > 8")
    page.wait_for_selector("#text-stop:disabled", state="attached")
    page.fill("#chat-input", "hello there")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-log .msg.assistant span')?.textContent.length > 0")
    page.screenshot(path=str(shots / "6-text.png"))
    assert page.inner_text("#chat-log .msg.user").endswith("hello there")
    assert page.is_hidden("#error")
    page.click("button[data-tab=image]")


def test_studio_chat_reads_an_uploaded_image(page, plain, shots, tmp_path):
    images, _ = renders(1, 7)
    data = png_bytes(images[0])
    (tmp_path / "scene.png").write_bytes(data)
    open_studio(page, plain, KEY)
    page.click("button[data-tab=text]")
    page.select_option("#text-model", "cap")
    page.fill("#max-tokens", "10")
    page.fill("#temperature", "0")
    page.click("#chat-reset")
    page.fill("#chat-input", "what is this")
    page.set_input_files("#chat-image", str(tmp_path / "scene.png"))
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-log .msg.assistant span')?.textContent.length > 0")
    page.wait_for_selector("#text-stop:disabled", state="attached")
    page.screenshot(path=str(shots / "7-chat-image.png"))
    assert page.inner_text("#chat-log .msg.user").endswith("[image]") and page.is_hidden("#error")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with plain.client() as c:  # the same greedy request without the studio
        want = c.post("/v1/chat/completions", json={"model": "cap", "max_tokens": 10, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]}).json()
    assert page.inner_text("#chat-log .msg.assistant span") == want["choices"][0]["message"]["content"]
    # without an image the captioner refuses, and the studio says why
    page.click("#chat-reset")
    page.fill("#chat-input", "what is this")
    page.click("#chat-send")
    page.wait_for_selector("#error:not([hidden])")
    assert "image" in page.inner_text("#error")
    page.click("button[data-tab=image]")
