"""`POST /v1/embeddings` against a real server on loopback: the official openai client's vectors equal the CLIP
model's own `encode_text` in this process, base64 decodes to the same floats, usage counts the tokenizer's tokens,
and bad requests are 4xx in OpenAI's error shape."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from test_clip import tiny_clip
from test_serve import Server

from genlab.models.base import GenerativeModel
from genlab.models.diffusion import DiffusionConfig, DiffusionModel

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red square", "a blue square", "a green square that is rather long for a caption"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed-models")
    tiny_clip(seed=3).save_pretrained(root / "clip")
    DiffusionModel(DiffusionConfig(num_classes=0, class_cond=False, image_size=8, channels=1, base_channels=8,
                                   channel_mults=(1,), num_res_blocks=1, attention_resolutions=())
                   ).save_pretrained(root / "ddpm")
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    s = Server(models, tmp_path_factory.mktemp("embed-data") / "data", key=None).start()
    yield s
    s.stop()


def test_openai_client_embeds_texts_as_the_model_does(server, models):
    clip = GenerativeModel.from_pretrained(models / "clip").eval()
    with torch.no_grad():
        want = clip.encode_text(TEXTS).numpy()
    res = server.openai().embeddings.create(model="clip", input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    assert [d.index for d in res.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    n_tokens = sum(len(r) for r in clip.tokenizer.encode_batch(TEXTS))
    assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens > 0

    one = server.openai().embeddings.create(model="clip", input=TEXTS[1])  # the client asks for base64
    np.testing.assert_allclose(np.array(one.data[0].embedding, dtype=np.float32), want[1], atol=1e-6)


def test_base64_is_little_endian_float32(server):
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"model": "clip", "input": TEXTS[:2], "encoding_format": "float"})
        b = c.post("/v1/embeddings", json={"model": "clip", "input": TEXTS[:2], "encoding_format": "base64"})
    assert r.status_code == b.status_code == 200
    for f, e in zip(r.json()["data"], b.json()["data"]):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(e["embedding"]), "<f4"),
                                      np.array(f["embedding"], dtype=np.float32))


@pytest.mark.parametrize("body, fragment", [
    ({"model": "ddpm", "input": "hi"}, "not embeddings"),
    ({"model": "nope", "input": "hi"}, "nope"),
    ({"input": "hi"}, "model must be"),
    ({"model": "clip", "input": []}, "non-empty list"),
    ({"model": "clip", "input": [1, 2, 3]}, "token ids are not taken"),
    ({"model": "clip", "input": "x" * 100_000}, "characters"),
    ({"model": "clip", "input": ["a"] * 5000}, "input"),
    ({"model": "clip", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "clip", "input": "hi", "dimensions": 3}, "dimensions"),
    ({"model": "clip", "input": "hi", "temperature": 1}, "unknown field"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_400_with_a_message(server, body, fragment):
    with server.client() as c:
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_openai_client_sees_the_error(server):
    with pytest.raises(openai.BadRequestError, match="not embeddings"):
        server.openai().embeddings.create(model="ddpm", input="hi")
