"""Serving under load: `POST /v1/images/generations` of a real `genlab serve` process over loopback.

    python benchmarks/serve_load.py [--models DIR --model NAME] [--requests 64] [--steps 20]
                                    [--concurrency 1,4,16,64] [--text]

Images half: a bounded number of one-image requests (label i % 10, seed i) at each concurrency, each client
waiting for its answer before it sends the next; the server batches what is queued together. Measured in the same
run, with the server idle: the offline batched rate of the same model (`model.sample` on batches of 16 with the
same sampler, steps and guidance, one generator per image) in this process. Prints one JSON line: per concurrency
images/s, p50 / p99 latency, errors and 429s, and the ratio of served images/s at concurrency 16 to the offline
batched rate, measured right before and right after that level (goal: at least 0.8, with zero errors).

Without --models, a tiny class-conditional DDPM (16x16, 1 channel, random weights: the speed does not depend on
training) is served. Both sides run one torch thread.

Text half: `--text` also runs `benchmarks/serve_load_text.py` (continuous batching of /v1/completions, its own
server) with the same --requests and --concurrency and puts its JSON line under "text".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.models.base import GenerativeModel  # noqa: E402
from genlab.models.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from genlab.sampling.controls import Guidance  # noqa: E402

OFFLINE_BATCH = 16


def bench_model(directory: Path) -> Path:
    torch.manual_seed(0)
    DiffusionModel(DiffusionConfig(image_size=16, channels=1, num_classes=10, base_channels=16, channel_mults=(1, 2),
                                   num_res_blocks=1, attention_resolutions=())).save_pretrained(directory)
    return directory


def offline_rate(model: GenerativeModel, steps: int, sampler: str, guidance: float, repeats: int) -> float:
    """Images/s of `model.sample` on batches of OFFLINE_BATCH with per-image generators (after one warm-up)."""
    labels = torch.arange(OFFLINE_BATCH) % 10 if model.labels_for(1, 0) is not None else None

    def draw(seed: int) -> None:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(OFFLINE_BATCH)]
        model.sample(OFFLINE_BATCH, cond=labels, generator=gens, sampler=sampler, steps=steps,
                     guidance=Guidance(guidance))

    draw(0)
    t0 = time.perf_counter()
    for r in range(repeats):
        draw(1000 * (r + 1))
    return OFFLINE_BATCH * repeats / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, data: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`genlab serve` on a free loopback port with `flags`, one thread; (process, base url) once it answers."""
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genlab.cli", "serve", "--models", str(models), "--data", str(data),
                             "--port", str(port), *flags], env=env,
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited before it was up")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not come up in 180 s")


def run_images(url: str, model: str, requests: int, concurrency: int, body: dict) -> dict:
    """`requests` one-image requests from `concurrency` clients; images/s, latencies, errors, 429s."""
    latencies: list[float] = []
    ok = errors = busy = 0
    batches: list[int] = []

    def one(i: int, client: httpx.Client) -> None:
        nonlocal ok, errors, busy
        t = time.perf_counter()
        try:
            r = client.post(url + "/v1/images/generations",
                            json={"model": model, "n": 1, "seed": i, "label": i % 10, **body})
        except httpx.HTTPError:
            errors += 1
            return
        latencies.append(time.perf_counter() - t)
        if r.status_code == 429:
            busy += 1
        elif r.status_code != 200 or not r.json()["data"][0].get("b64_json"):
            errors += 1
        else:
            ok += 1
            batches.append(r.json()["batch"]["images"])

    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda i: one(i, clients[i % concurrency]), range(requests)))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    lat = sorted(latencies) or [float("nan")]
    return {"images_per_s": round(ok / wall, 3), "seconds": round(wall, 2), "images": ok,
            "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "errors": errors, "429s": busy, "mean_batch": round(sum(batches) / max(1, len(batches)), 2)}


def text_half(args: argparse.Namespace) -> dict | None:
    """The text half (continuous batching of /v1/completions): benchmarks/serve_load_text.py's JSON line."""
    script = Path(__file__).resolve().parent / "serve_load_text.py"
    out = subprocess.run([sys.executable, str(script), "--requests", str(args.requests), "--concurrency",
                          args.concurrency], capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="a folder of model folders (default: a tiny DDPM)")
    ap.add_argument("--model", default="bench", help="the model's name in --models")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-queue", type=int, default=4096, help="the server's queue capacity (429 past it)")
    ap.add_argument("--offline-repeats", type=int, default=3)
    ap.add_argument("--text", action="store_true", help="also run the text half")
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        if not args.models:
            bench_model(models / args.model)
        from genlab.models.base import resolve_model_dir

        model = GenerativeModel.from_pretrained(resolve_model_dir(models / args.model)).eval()

        def offline() -> float:
            return offline_rate(model, args.steps, args.sampler, args.guidance, args.offline_repeats)

        proc, url = start_server(models, Path(tmp) / "data", "--max-queue", str(args.max_queue), "--max-batch", "64")
        body = {"steps": args.steps, "sampler": args.sampler, "guidance_scale": args.guidance}
        results, rates = {}, []
        try:
            run_images(url, args.model, 2, 1, body)  # load the model, warm up
            for c in levels:  # the offline rate right before and after the level the goal compares
                if c == 16 or (16 not in levels and not rates):
                    rates.append(offline())
                results[c] = run_images(url, args.model, args.requests, c, body)
                if c == 16:
                    rates.append(offline())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rate = sum(rates) / len(rates)
    out = {"benchmark": "serve_load", "images": {
        "model": args.models and args.model or "tiny DDPM 16x16x1, base 16, random weights",
        "requests_per_level": args.requests, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
        "offline_batched_images_per_s": round(rate, 3), "offline_runs": [round(r, 3) for r in rates],
        "offline_batch": OFFLINE_BATCH,
        "concurrency": {str(c): r for c, r in results.items()}}}
    if 16 in results:
        out["images"]["ratio_16_to_offline"] = round(results[16]["images_per_s"] / rate, 3)
        out["images"]["goal"] = "ratio_16_to_offline >= 0.8 with zero errors"
    out["text"] = text_half(args) if args.text else None
    out["machine"] = {"cpus": os.cpu_count(), "torch_threads": 1, "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
