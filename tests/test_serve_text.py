"""Text serving: the continuous-batching engine against decoding each request alone (`sampling.text.generate`),
per-request settings, joins and leaves mid-batch, stop strings; the OpenAI-shaped API through the official
`openai` client against a real server process on loopback."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch
from test_gpt import dataset

from genlab.errors import GenlabError
from genlab.models.gpt import GPT, GPTConfig
from genlab.sampling.text import generate, top_k_filter
from genlab.serve.textbatch import BatchDecoder, TextEngine, TextRequest

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the", "a quick brown", "over the lazy dog and", "p", "jumps over"]


@functools.lru_cache(maxsize=1)
def trained_gpt() -> GPT:
    """A 2-layer char GPT with grouped KV heads, trained 100 steps on the toy text (peaked, varied outputs)."""
    torch.manual_seed(0)
    with torch.random.fork_rng():
        model = GPT.build(GPTConfig(tokenizer="char", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32),
                          dataset())
        data = model.prepare_data(dataset())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            loss = model.training_losses(data.get_batch(torch.randint(len(data), (16,), generator=g)))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def ids(text: str) -> list[int]:
    return trained_gpt().tokenizer.encode(text, bos=True)


def alone(req: TextRequest) -> list[int]:
    """The request decoded by itself with `sampling.text.generate` (the reference)."""
    cfg = req.generation_config()
    return generate(trained_gpt(), [req.prompt], cfg).tokens[0]


def tokens(events) -> list[int]:
    return [t.id for e in events for t in e.tokens]


def test_greedy_batch_equals_each_request_alone():
    reqs = [TextRequest(ids(p), max_tokens=12 + 3 * i, temperature=0, stop_token_ids=[]) for i, p in enumerate(PROMPTS)]
    events = BatchDecoder(trained_gpt()).run(reqs)
    for r, ev in zip(reqs, events):
        assert tokens(ev) == alone(r)
        assert ev[-1].finish_reason == "length" and ev[-1].completion_tokens == r.max_tokens
        assert sum(len(e.tokens) for e in ev) == r.max_tokens


@pytest.mark.parametrize("chunk", [64, 2])
def test_requests_join_and_leave_mid_batch(monkeypatch, chunk):
    """A join with a prompt longer than the batch's columns (the batch shifts right), joins after leaves (slots
    refilled by the last row), more rows than slots, a request alone for a while, and with `chunk` 2 a store that
    fills every few steps (squeezed or grown): every row still decodes as it does alone, its logprobs agree."""
    from genlab.serve import textbatch

    monkeypatch.setattr(textbatch, "CACHE_CHUNK", chunk)
    model = trained_gpt()
    dec = BatchDecoder(model)
    plan = {0: ["jumps over"], 2: ["p"], 3: ["over the lazy dog and the quick"], 9: ["a", "the lazy", "box", "my"],
            30: ["dog"]}
    reqs, events = [], []
    for step in range(200):
        for text in plan.get(step, []):
            reqs.append(TextRequest(ids(text), max_tokens=5 + 3 * len(reqs), temperature=0, stop_token_ids=[],
                                    logprobs=0))
            events.append([])
            dec.add(reqs[-1], events[-1].append)
        if step > 30 and not dec.busy:
            break
        dec.step()
    assert len(reqs) == 8 and not dec.busy
    for r, ev in zip(reqs, events):
        ref = generate(model, [r.prompt], r.generation_config())
        assert tokens(ev) == ref.tokens[0]
        lps = torch.tensor([t.logprob for e in ev for t in e.tokens])
        torch.testing.assert_close(lps, torch.tensor(ref.logprobs[0]), atol=1e-4, rtol=0)
    assert dec.cache is None  # everyone left: the batch's storage is gone


def test_each_request_keeps_its_own_settings_and_generator():
    """Seeded sampling rows beside greedy and top-k rows give what each gives alone with the same seed."""
    reqs = [
        TextRequest(ids("the"), max_tokens=20, temperature=1.0, seed=7, stop_token_ids=[]),
        TextRequest(ids("the"), max_tokens=20, temperature=1.0, seed=8, stop_token_ids=[]),
        TextRequest(ids("a quick brown"), max_tokens=15, temperature=0, stop_token_ids=[]),
        TextRequest(ids("over"), max_tokens=18, temperature=0.7, top_k=3, top_p=0.9, seed=1, stop_token_ids=[]),
        TextRequest(ids("the"), max_tokens=20, temperature=1.0, seed=7, stop_token_ids=[]),
    ]
    events = BatchDecoder(trained_gpt()).run(reqs)
    got = [tokens(e) for e in events]
    for r, g in zip(reqs, got):
        assert g == alone(r)
    assert got[0] == got[4] and got[0] != got[1]
    assert [e[-1].seed for e in events] == [7, 8, events[2][-1].seed, 1, 7]


def test_rows_with_prefix_embeddings_decode_as_alone():
    """Image-prefixed rows (LLaVA-style input embeddings before the prompt) beside plain rows."""
    model = trained_gpt()
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(5, 32, generator=g) * 0.5, None, torch.randn(3, 32, generator=g) * 0.5]
    reqs = [TextRequest(ids(p), max_tokens=12, temperature=0, stop_token_ids=[], prefix=x)
            for p, x in zip(PROMPTS, prefixes)]
    events = BatchDecoder(model).run(reqs)
    for r, ev in zip(reqs, events):
        ref = generate(model, [r.prompt], r.generation_config(), prefix=None if r.prefix is None else r.prefix[None])
        assert tokens(ev) == ref.tokens[0]
    assert events[0][-1].prompt_tokens == 5 + len(reqs[0].prompt)
    plain = BatchDecoder(model).run([TextRequest(ids(PROMPTS[0]), max_tokens=12, temperature=0, stop_token_ids=[])])
    assert events[0][0].tokens[0].logprob != pytest.approx(plain[0][0].tokens[0].logprob, abs=1e-4)  # it was read


def test_sampled_tokens_stay_inside_each_rows_top_k():
    model = trained_gpt()
    dec = BatchDecoder(model)
    reqs = [TextRequest(ids(p), max_tokens=10, temperature=5.0, top_k=k, seed=k, stop_token_ids=[])
            for p, k in zip(PROMPTS, (1, 2, 3, 2, 1))]
    events = dec.run(reqs)
    for r, ev in zip(reqs, events):
        seq = list(r.prompt)
        for t in tokens(ev):
            logits = model(torch.tensor([seq]))[0, -1:]
            assert torch.isfinite(top_k_filter(logits, r.top_k)[0, t])
            seq.append(t)


def test_stop_strings_and_streamed_text():
    """The text stops before the first stop string; streamed pieces never show a part of it and add up to the
    final text; a stop token ends a row without appearing."""
    model = trained_gpt()
    tok = model.tokenizer
    free_req = TextRequest(ids("the"), max_tokens=40, temperature=1.0, seed=3, stop_token_ids=[])
    free = tok.decode(alone(free_req))
    stop = free[10:13]
    reqs = [TextRequest(ids("the"), max_tokens=40, temperature=1.0, seed=3, stop_token_ids=[], stop=[stop, "@@"]),
            TextRequest(ids("a quick brown"), max_tokens=25, temperature=0, stop_token_ids=[])]
    greedy = alone(reqs[1])
    reqs.append(TextRequest(ids("a quick brown"), max_tokens=25, temperature=0, stop_token_ids=[greedy[4]]))
    events = BatchDecoder(model).run(reqs)
    text = "".join(e.delta for e in events[0])
    assert text == free[: free.find(stop)] and events[0][-1].finish_reason == "stop"
    assert all(stop[:2] not in e.delta for e in events[0][:-1])
    assert tokens(events[1]) == greedy
    assert tokens(events[2]) == greedy[: greedy.index(greedy[4])] and events[2][-1].finish_reason == "stop"


def test_logprobs_and_top_alternatives():
    model = trained_gpt()
    req = TextRequest(ids("over the"), max_tokens=6, temperature=0, stop_token_ids=[], logprobs=3)
    ev = BatchDecoder(model).run([req])[0]
    seq = list(req.prompt)
    for info in (t for e in ev for t in e.tokens):
        logp = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
        assert info.logprob == pytest.approx(float(logp.max()), abs=1e-4)
        assert [lp for _, lp in info.top] == pytest.approx(logp.topk(3).values.tolist(), abs=1e-4)
        assert info.top[0][0] == model.tokenizer.decode([info.id])
        seq.append(info.id)


def test_a_cancelled_request_leaves_and_the_rest_go_on():
    dec = BatchDecoder(trained_gpt())
    reqs = [TextRequest(ids(p), max_tokens=15, temperature=0, stop_token_ids=[]) for p in PROMPTS[:3]]
    events = [[] for _ in reqs]
    seqs = [dec.add(r, e.append) for r, e in zip(reqs, events)]
    for _ in range(4):
        dec.step()
    seqs[1].cancelled = True
    while dec.busy:
        dec.step()
    assert events[1][-1].finish_reason == "cancelled" and len(tokens(events[1])) == 4
    assert tokens(events[0]) == alone(reqs[0]) and tokens(events[2]) == alone(reqs[2])


def test_a_row_whose_sampling_fails_leaves_alone():
    """Settings that overflow (logits / 1e-40 is inf) end that row with an error; the other rows go on."""
    reqs = [TextRequest(ids("the"), max_tokens=8, temperature=1e-40, seed=1, stop_token_ids=[]),
            TextRequest(ids("a quick"), max_tokens=8, temperature=0, stop_token_ids=[])]
    events = BatchDecoder(trained_gpt()).run(reqs)
    assert events[0][-1].finish_reason == "error" and events[0][-1].error
    assert tokens(events[1]) == alone(reqs[1])


def test_engine_thread_serves_concurrent_submitters():
    engine = TextEngine(trained_gpt(), max_batch=3)  # five requests, three rows: two wait for a free row
    try:
        reqs = [TextRequest(ids(p), max_tokens=10, temperature=0, stop_token_ids=[]) for p in PROMPTS]
        results: list[list] = [[] for _ in reqs]
        done = [threading.Event() for _ in reqs]

        def submit(i: int) -> None:
            def cb(ev) -> None:
                results[i].append(ev)
                if ev.finish_reason:
                    done[i].set()
            engine.submit(reqs[i], cb)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        assert all(d.wait(60) for d in done)
        for r, ev in zip(reqs, results):
            assert tokens(ev) == alone(r)
    finally:
        engine.close()


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(logprobs=21), dict(stop=[""]), dict(seed=-1), dict(prompt=[])])
def test_bad_settings_are_one_line_errors(bad):
    req = TextRequest(**({"prompt": ids("the")} | bad))
    with pytest.raises(GenlabError) as e:
        BatchDecoder(trained_gpt()).add(req)
    assert "\n" not in str(e.value)


# -- the HTTP API: a real server process on loopback, called with the official openai client ------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_captioner():
    """A random LLaVA-style captioner around the trained GPT (a 1-layer ViT tower on 16 x 16 images)."""
    from genlab.config import to_dict
    from genlab.models.captioner import Captioner, CaptionerConfig
    from genlab.models.clip import CLIPConfig

    gpt = trained_gpt()
    clip = CLIPConfig(image_size=16, channels=3, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
                      vocab_size=gpt.config.vocab_size, text_width=16, text_layers=1, text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(clip_config=to_dict(clip), gpt=gpt.config), tokenizer=gpt.tokenizer)
    model.gpt.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        model.projector.fc2.weight.mul_(20.0)  # a prefix loud enough to change the answer
    return model.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`genlab serve` in its own process on a free loopback port, serving the trained GPT as `tiny` (and a
    captioner as `cap`); yields (base url, captioner)."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    root = tmp_path_factory.mktemp("serve")
    trained_gpt().save_pretrained(root / "models" / "tiny")
    cap = tiny_captioner()
    cap.save_pretrained(root / "models" / "cap")
    port = _free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genlab.cli", "serve", "--models", str(root / "models"),
                             "--data", str(root / "data"), "--port", str(port), "--max-n", "4"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield url, cap
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_text(prompt: list[int], max_tokens: int, **kw) -> str:
    req = TextRequest(prompt, max_tokens=max_tokens, temperature=0, **kw)
    return trained_gpt().tokenizer.decode(alone(req))


def test_api_completions_greedy_equal_decoding_alone(client):
    r = client.completions.create(model="tiny", prompt=["the quick", "over"], max_tokens=12, temperature=0, n=2,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, p in zip(r.choices, ["the quick", "the quick", "over", "over"]):
        assert c.text == reference_text(ids(p), 12)
        assert len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) == c.logprobs.text_offset[-1] + 1 <= 12
        assert all(max(top.values()) == pytest.approx(lp) for top, lp in zip(c.logprobs.top_logprobs,
                                                                             c.logprobs.token_logprobs))
    assert r.usage.prompt_tokens == len(ids("the quick")) + len(ids("over"))
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_api_chat_with_seed_and_stop(client):
    from genlab.data.chat import encode_chat

    msgs = [{"role": "system", "content": "hi"}, {"role": "user", "content": "the"}]
    prompt = encode_chat(trained_gpt().tokenizer, msgs, add_generation_prompt=True)[0]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference_text(prompt, 10)
    kw = dict(model="tiny", messages=msgs, max_tokens=15, temperature=1.0, n=3, seed=11)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # the seed reproduces every choice
    req = TextRequest(prompt, max_tokens=15, temperature=1.0, seed=12)  # choice 1 samples with seed + 1
    assert texts[1] == trained_gpt().tokenizer.decode(alone(req))
    stop = texts[1][2:4]
    if stop.strip():
        cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, temperature=1.0, seed=12,
                                             stop=[stop])
        assert cut.choices[0].message.content == texts[1][: texts[1].find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_api_streaming_gives_the_same_text(client):
    full = client.completions.create(model="tiny", prompt="jumps", max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="jumps", max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    msgs = [{"role": "user", "content": "pack my"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    parts = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_api_concurrent_requests_equal_decoding_alone(client):
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["the", "a quick brown", "over the lazy", "p", "jumps over", "dog", "pack", "my box"]
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0),
                            prompts))
    assert [o.choices[0].text for o in outs] == [reference_text(ids(p), 16) for p in prompts]


@pytest.mark.parametrize("body", [
    dict(prompt="the", max_tokens=10_000),  # past the limit
    dict(prompt="the", max_tokens=30),  # past the model's 32-token context
    dict(prompt="the", n=0), dict(prompt="the", n=5),  # n outside [1, --max-n]
    dict(prompt="x" * 3000),  # too many characters
    dict(prompt="the", temperature="hot"), dict(prompt="the", temperature=-1), dict(prompt="the", top_p=2.0),
    dict(prompt="the", stop=["a", "b", "c", "d", "e"]), dict(prompt="the", stop=""), dict(prompt="the", logprobs=6),
    dict(prompt="the", bogus=1), dict(prompt=[10**9]), dict(prompt=[]), dict(prompt="the", model="nope"),
    dict(prompt="the", seed=-3), dict(prompt="the", logit_bias={"1": 5.0}), dict(prompt="the", temperature=1e-40),
    dict(prompt="the", repetition_penalty=1e-300), dict(prompt="the", top_k=-1), dict(prompt="the", min_p=1.0),
])
def test_api_bad_completions_get_4xx_in_openai_shape(server, body):
    import httpx

    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny"} | body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"]


def test_api_image_parts_follow_the_models_capability(server, client):
    import base64
    import io

    import httpx
    import openai
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "the"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match="does not read images"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": "tiny", "messages": bad}, timeout=30)
    assert r.status_code == 400 and "data URL" in r.json()["error"]["message"]
    cap = server[1]
    from genlab.commands.sample import _read_image
    from genlab.data.chat import encode_chat

    path = io.BytesIO(buf.getvalue())
    image = _read_image(path, 3, 16, "image")
    p = cap.image_prompt(image, ["the"])
    assert p.prompts[0] == encode_chat(cap.tokenizer, [{"role": "user", "content": "the"}], True)[0]
    ref = generate(p.model, p.prompts, TextRequest(p.prompts[0], max_tokens=8, temperature=0).generation_config(),
                   prefix=p.prefix)
    r = client.chat.completions.create(model="cap", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == cap.tokenizer.decode(ref.tokens[0])
    with pytest.raises(openai.BadRequestError, match="answers about an image"):
        client.chat.completions.create(model="cap", messages=[{"role": "user", "content": "the"}], max_tokens=5)


def test_queued_jobs_join_a_running_batch(tmp_path):
    """A worker running job A takes job B (queued, same model) into its batch; both texts equal decoding alone."""
    from genlab.serve.jobs import WorkerContext
    from genlab.serve.limits import Limits
    from genlab.serve.pool import ModelPool
    from genlab.serve.store import Store
    from genlab.serve.text_api import KIND_CHAT, KIND_COMPLETION, prepare, run_text

    trained_gpt().save_pretrained(tmp_path / "models" / "tiny")
    pool, limits, store = ModelPool(tmp_path / "models"), Limits(), Store(tmp_path / "data")
    bodies = [(KIND_COMPLETION, {"model": "tiny", "prompt": "the", "max_tokens": 25, "temperature": 0}),
              (KIND_CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "a quick"}], "max_tokens": 9,
                           "temperature": 0}),
              (KIND_COMPLETION, {"model": "tiny", "prompt": "over", "max_tokens": 12, "temperature": 0, "n": 2})]
    jobs = []
    for kind, body in bodies:
        p = prepare(kind, body, pool, limits, store)
        jobs.append(store.submit(kind, p.model, p.params, p.seed, p.batch_key, p.cost)[0])
    first = store.claim("w0", [KIND_COMPLETION, KIND_CHAT], 1)
    assert [j.id for j in first] == [jobs[0].id]
    run_text(first, pool.get("tiny"), WorkerContext(store, limits, "w0"))
    done = [store.get(j.id) for j in jobs]
    assert [j.state for j in done] == ["done"] * 3 and {j.attempts for j in done} == {1}
    for j in done:
        for k, c in enumerate(j.result["choices"]):
            prompt = j.params["prompts"][k // j.params["n"]]
            assert c["text"] == reference_text(prompt, j.params["max_tokens"])


USER = [{"role": "user", "content": "the"}]


@pytest.mark.parametrize("body", [
    dict(messages=[]), dict(messages="hi"), dict(messages=[{"role": "robot", "content": "x"}]),
    dict(messages=[{"role": "user"}]), dict(messages=[{"role": "user", "content": 5}]),
    dict(messages=[{"role": "user", "content": "x", "extra": 1}]),
    dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
    dict(messages=[{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,@@"}}]}]),
    dict(messages=[{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]),
    dict(messages=USER, top_logprobs=2), dict(messages=USER, logprobs=True, top_logprobs=21),
    dict(messages=USER, response_format={"type": "json_object"}), dict(messages=USER, n=5),
    dict(messages=USER, max_completion_tokens=0), dict(messages=USER, stream="yes"),
    dict(messages=USER, stream_options={"include_usage": "x"}), dict(messages=USER, temperature=float("nan")),
    dict(messages=[{"role": "user", "content": "x" * 2001}]), dict(messages=[{"role": "user", "content": ""}] * 1025),
])
def test_api_bad_chats_get_4xx_and_the_server_goes_on(server, body):
    import httpx

    r = httpx.post(server[0] + "/v1/chat/completions", content=json.dumps({"model": "tiny"} | body), timeout=30,
                   headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]
    ok = httpx.post(server[0] + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 3},
                    timeout=30)
    assert ok.status_code == 200


def test_api_malformed_json_is_a_400(server):
    import httpx

    r = httpx.post(server[0] + "/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_api_text_jobs_are_recorded_in_the_queue(server):
    """POST /v1/jobs with a text kind: a stored job with its seed and token ids, whose result is the completion."""
    import time

    import httpx

    body = {"kind": "text.completion", "params": {"model": "tiny", "prompt": "over", "max_tokens": 10,
                                                  "temperature": 0}}
    r = httpx.post(server[0] + "/v1/jobs", json=body, headers={"Idempotency-Key": "text-job-1"}, timeout=30)
    assert r.status_code in (200, 202), r.text
    job = r.json()
    assert job["kind"] == "text.completion" and job["params"]["prompts"] == [ids("over")]
    for _ in range(300):
        job = httpx.get(server[0] + f"/v1/jobs/{job['id']}", timeout=30).json()
        if job["state"] == "done":
            break
        time.sleep(0.1)
    assert job["result"]["object"] == "text_completion"
    assert job["result"]["choices"][0]["text"] == reference_text(ids("over"), 10)
    again = httpx.post(server[0] + "/v1/jobs", json=body, headers={"Idempotency-Key": "text-job-1"}, timeout=30)
    assert again.json()["id"] == job["id"]  # a retry with the same key gets the same job


@pytest.mark.slow
def test_text_jobs_survive_a_killed_server(tmp_path):
    """Queue text jobs, SIGKILL the server while it decodes them, start it again: every job ends with the text of
    decoding it alone, and an idempotent retry gets the same job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    trained_gpt().save_pretrained(tmp_path / "models" / "tiny")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def start() -> tuple[subprocess.Popen, str]:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "genlab.cli", "serve", "--models", str(tmp_path / "models"),
                                 "--data", str(tmp_path / "data"), "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the server did not start")

    from genlab.serve.limits import Limits
    from genlab.serve.pool import ModelPool
    from genlab.serve.store import Store
    from genlab.serve.text_api import KIND_COMPLETION, prepare

    store, pool = Store(tmp_path / "data"), ModelPool(tmp_path / "models")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(150)]
    ids_ = []
    for i, p in enumerate(prompts):  # queued before the server starts: seconds of work for it
        prep = prepare(KIND_COMPLETION, {"model": "tiny", "prompt": p, "max_tokens": 10, "temperature": 0, "n": 4},
                       pool, Limits(), store)
        ids_.append(store.submit(KIND_COMPLETION, prep.model, prep.params, prep.seed, prep.batch_key, prep.cost,
                                 f"k{i}")[0].id)
    store.close()
    proc, url = start()
    while httpx.get(url + f"/v1/jobs/{ids_[0]}", timeout=30).json()["state"] != "done":
        time.sleep(0.01)
    before = httpx.get(url + f"/v1/jobs/{ids_[-1]}", timeout=30).json()["state"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert before != "done"  # the restarted server has work left
    proc, url = start()
    try:
        for _ in range(600):
            states = [httpx.get(url + f"/v1/jobs/{j}", timeout=30).json() for j in ids_]
            if all(s["state"] == "done" for s in states):
                break
            time.sleep(0.1)
        for p, s in zip(prompts, states):
            assert [c["text"] for c in s["result"]["choices"]] == [reference_text(ids(p), 10)] * 4
        body = {"kind": "text.completion", "params": {"model": "tiny", "prompt": prompts[3], "max_tokens": 10,
                                                      "temperature": 0, "n": 4}}
        again = httpx.post(url + "/v1/jobs", json=body, headers={"Idempotency-Key": "k3"}, timeout=30)
        assert again.json()["id"] == ids_[3]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
