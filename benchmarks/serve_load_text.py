"""Text serving under load: `POST /v1/completions` of a real `genlab serve` process over loopback.

    python benchmarks/serve_load_text.py [--model DIR] [--requests 64] [--max-tokens 64] [--concurrency 1,4,16,64]

The same greedy requests (fortunes lines of different lengths as prompts) are sent at each concurrency: at 1 the
server decodes them one at a time; above 1 its worker decodes the queued requests together with continuous
batching (requests join the running batch as they come, so the server's wait for a batch to fill is off and
one-at-a-time requests do not pay it). Without --model, a GPT of fortunes-gpt's shape (BPE 2048, 4 x 192) with
random fan-in-scaled weights (peaked, varied next-token distributions) is served. Prints one JSON line: per
concurrency the generated tokens/s, p50 / p99 latency, errors and 429s, whether every text equals the one-at-a-time
text, and the speedup of concurrency 16 over 1 (goal: at least 3x, with the same greedy outputs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_load import start_server  # noqa: E402  (the same server start as the image half)

from genlab.data import load_dataset  # noqa: E402
from genlab.data.tokenizer import train_tokenizer  # noqa: E402
from genlab.models.gpt import GPT, GPTConfig  # noqa: E402


def bench_model(text: str) -> GPT:
    """fortunes-gpt's shape with random weights N(0, 1 / fan_in) (a trained model's peaked outputs, roughly)."""
    tok = train_tokenizer(text[:200_000], "bpe", 2048, "vocab")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=6, n_embd=192),
                tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return model.eval()


def run_load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Send every prompt (greedy) with `concurrency` clients; texts in prompt order, tokens/s and latencies."""
    texts: list[str | None] = [None] * len(prompts)
    latencies: list[float] = []
    tokens, errors, busy = 0, 0, 0

    def one(i: int, client: httpx.Client) -> None:
        nonlocal tokens, errors, busy
        t = time.perf_counter()
        r = client.post(url + "/v1/completions", json={"model": model, "prompt": prompts[i], "max_tokens": max_tokens,
                                                       "temperature": 0})
        latencies.append(time.perf_counter() - t)
        if r.status_code == 429:
            busy += 1
        elif r.status_code != 200:
            errors += 1
        else:
            body = r.json()
            texts[i] = body["choices"][0]["text"]
            tokens += body["usage"]["completion_tokens"]

    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda i: one(i, clients[i % concurrency]), range(len(prompts))))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    lat = sorted(latencies)
    return {"tokens_per_s": round(tokens / wall, 1), "seconds": round(wall, 2), "tokens": tokens,
            "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "errors": errors, "429s": busy, "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GPT model folder (default: fortunes-gpt's shape, random weights)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16,64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [int(c) for c in args.concurrency.split(",")]
    text = load_dataset("fortunes").text
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 12]
    prompts = [ln[: 12 + (7 * i) % 48] for i, ln in enumerate(lines[: args.requests])]  # 12 to 59 characters
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        if args.model:
            (models).mkdir()
            (models / "bench").symlink_to(Path(args.model).resolve())
        else:
            bench_model(text).save_pretrained(models / "bench")
        proc, url = start_server(models, Path(tmp) / "data", "--max-queue", "4096", "--batch-wait-ms", "0")
        try:
            run_load(url, "bench", prompts[:2], args.max_tokens, 1)  # load the model, warm up
            results = {c: run_load(url, "bench", prompts, args.max_tokens, c) for c in levels}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = results[levels[0]]["texts"]
    out = {"benchmark": "serve_load_text", "model": args.model or "fortunes-gpt shape, random weights",
           "requests": len(prompts), "max_tokens": args.max_tokens, "threads": 1, "concurrency": {}}
    for c, r in results.items():
        r["same_greedy_outputs_as_one_at_a_time"] = r.pop("texts") == base
        out["concurrency"][str(c)] = r
    if 1 in results and 16 in results:
        out["speedup_16_vs_1"] = round(results[16]["tokens_per_s"] / results[1]["tokens_per_s"], 2)
        out["goal"] = "speedup_16_vs_1 >= 3 with the same greedy outputs"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
