"""`genlab serve --models DIR [--host 127.0.0.1 --port 8000 --workers N --api-key-file F ...]`: an
OpenAI-compatible HTTP API (FastAPI + uvicorn) over the model folders of DIR, backed by a durable SQLite job queue
(in `--data`, default DIR/.serve). Jobs left queued or running by a killed server run when it starts again.

`--workers N`: one worker thread in the server process and N - 1 worker processes, all claiming batches from the
same queue; each loads the models it is asked for and keeps them within `--memory-budget-mb`.
"""

from __future__ import annotations

import argparse
import ipaddress
import multiprocessing
import os
import socket
import sys
from pathlib import Path

from genlab.config import check_device, check_int, check_number, check_output_path
from genlab.errors import GenlabError

MAX_WORKERS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="folder whose sub-folders are model folders or run folders; "
                   "each is served under its folder name")
    p.add_argument("--data", default=None, help="the server's data folder: job database and images "
                   "(default: MODELS/.serve)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="model workers sharing the queue: one thread in the "
                   "server and N - 1 processes")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment, one replica (with its own "
                   "model worker) per --workers, on the Ray cluster of RAY_ADDRESS or a new local one")
    p.add_argument("--api-key-file", default=None, help="require Authorization: Bearer KEY; the file holds one key "
                   "per line, as sha256:HEX (preferred) or the key itself")
    p.add_argument("--max-queue", type=int, default=256, help="jobs queued or running before requests get 429")
    p.add_argument("--max-n", type=int, default=16, help="images per request")
    p.add_argument("--max-steps", type=int, default=200, help="sampling steps per request")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (uploads included)")
    p.add_argument("--max-batch", type=int, default=64, help="images a worker draws in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="after claiming a batch with room left, wait "
                   "this long for compatible requests to join it (0: never wait)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a synchronous request waits for its job")
    p.add_argument("--memory-budget-mb", type=float, default=4096.0, help="weights a worker keeps loaded; past it "
                   "the least recently used model is unloaded")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser requests from this origin "
                   "(repeatable; default: CORS off)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--prompt-filter", default=None, help="refuse prompts matching a rule of this list file (one "
                   "word or phrase per line) with a 400 naming the rule")
    p.add_argument("--safety-clip", default=None, help="a CLIP model folder whose image embeddings check every "
                   "output against --safety-concepts")
    p.add_argument("--safety-concepts", default=None, help="concepts to block, one 'CONCEPT = COSINE_THRESHOLD' "
                   "per line; a blocked image is replaced by black and flagged")


def _check_args(args: argparse.Namespace) -> None:
    if not Path(args.models).is_dir():
        raise GenlabError(f"--models {args.models} is not a folder; give the folder that holds model folders")
    check_int("--port", args.port, 1, 65535)
    check_int("--workers", args.workers, 1, MAX_WORKERS)
    check_int("--max-queue", args.max_queue, 1, 1_000_000)
    check_int("--max-n", args.max_n, 1, 10_000)
    check_int("--max-steps", args.max_steps, 1, 10_000)
    check_int("--max-batch", args.max_batch, 1, 10_000)
    check_number("--max-body-mb", args.max_body_mb, 0.001, 1024)
    check_number("--timeout", args.timeout, 0.1, 86_400)
    check_number("--batch-wait-ms", args.batch_wait_ms, 0, 10_000)
    check_number("--memory-budget-mb", args.memory_budget_mb, 0, 10**7)
    check_device("--device", args.device)
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise GenlabError(f"--host {args.host} is not an IP address; use 127.0.0.1 (loopback) or 0.0.0.0") from None
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise GenlabError(f"--cors-origin {origin} must be an origin such as http://localhost:3000")
    check_output_path(args.data or str(Path(args.models) / ".serve"), "--data", folder=True)
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise GenlabError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port "
                              "or --host") from None


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.ray:
        try:
            from genlab.serve import ray_app
        except ImportError as e:
            raise GenlabError(f"--ray needs Ray Serve ({e.name} is missing): pip install 'genlab[ray]'") from None
    from genlab.serve.limits import Limits, read_key_file

    digests = read_key_file(args.api_key_file) if args.api_key_file else []
    import torch
    import uvicorn

    from genlab.serve.app import ServeState, create_app
    from genlab.serve.jobs import worker_process
    from genlab.serve.pool import ModelPool
    from genlab.serve.store import Store

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    data = Path(args.data or Path(args.models) / ".serve")
    limits = Limits(max_n=args.max_n, max_steps=args.max_steps, max_body_bytes=int(args.max_body_mb * 2**20),
                    max_queue=args.max_queue, timeout_s=args.timeout, max_batch=args.max_batch,
                    batch_wait_s=args.batch_wait_ms / 1000)
    store = Store(data)
    from genlab.serve.safety import configure

    guards = configure(data, args.prompt_filter, args.safety_clip, args.safety_concepts) or {}
    requeued = store.requeue_running()  # a killed server's running jobs run again, from scratch, same seed
    if args.ray:  # the replicas share this data folder's store: paths absolute, as replicas start elsewhere
        config = ray_app.ReplicaConfig(str(Path(args.models).resolve()), str(data.resolve()), limits, tuple(digests),
                                       args.memory_budget_mb, device, tuple(args.cors_origin))
        return ray_app.serve_forever(config, args.workers, args.host, args.port,
                                     f"genlab serve: http://{args.host}:{args.port} as a Ray Serve deployment of "
                                     f"{args.workers} replica(s); data in {data}; {requeued} job(s) requeued")
    pool = ModelPool(args.models, args.memory_budget_mb, device)
    state = ServeState(store, pool, limits, digests)
    app = create_app(state, args.cors_origin or None)
    procs = []
    ctx = multiprocessing.get_context("spawn")
    for i in range(1, args.workers):
        p = ctx.Process(target=worker_process, args=(str(data), str(args.models), limits, args.memory_budget_mb,
                                                     device, f"worker-{i}", os.getpid()), daemon=True)
        p.start()
        procs.append(p)
    names = ", ".join(pool.entries) or "none yet"
    print(f"genlab serve: http://{args.host}:{args.port} serving {names}; data in {data}; {args.workers} "
          f"worker(s); {requeued} job(s) requeued; keys {'required' if digests else 'off'}; prompt filter "
          f"{'on' if 'prompt_filter' in guards else 'off'}; output checker {'on' if 'concepts' in guards else 'off'}",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
    return 0
