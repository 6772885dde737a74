"""`genlab serve --ray`: the same FastAPI application as a Ray Serve deployment, one replica per worker.

Each replica builds the application of `create_app` in its own process (Ray Serve runs its lifespan, so each one
starts its own model worker thread) over the same job store: a request answered by one replica may be drawn by
another replica's worker, batching as on one machine. On one machine the replicas share the SQLite file of the
data folder; across machines they need that folder on a filesystem with working locks (see the README).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from genlab.serve.app import ServeState, create_app
from genlab.serve.limits import Limits
from genlab.serve.pool import ModelPool
from genlab.serve.store import Store

APP_NAME = "genlab"


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica needs to build the application (plain values: it travels to the replicas pickled)."""

    models: str
    data: str
    limits: Limits
    key_digests: tuple[str, ...] = ()
    memory_budget_mb: float = 4096.0
    device: str = "cpu"
    cors_origins: tuple[str, ...] = ()


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class GenlabReplica:
    """One replica: the whole application with its own model pool and worker, on the shared store. The app is
    built in the replica (`__serve_build_asgi_app__`), since a store's connections do not travel between processes."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        import torch

        c = self.config
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        state = ServeState(Store(c.data), ModelPool(c.models, c.memory_budget_mb, c.device), c.limits,
                           list(c.key_digests))
        name = f"replica-{serve.get_replica_context().replica_id.unique_id}"  # the worker's name in the store
        return create_app(state, list(c.cors_origins) or None, worker_name=name)


def deploy(config: ReplicaConfig, replicas: int, host: str, port: int) -> None:
    """Start Ray Serve's HTTP proxy on host:port and run `replicas` replicas under `/`, returning once they are
    healthy. Needs a connected Ray (`ray.init`)."""
    Store(Path(config.data))  # the schema, once, before the replicas open it
    serve.start(http_options={"host": host, "port": port})
    serve.run(GenlabReplica.options(num_replicas=replicas).bind(config), name=APP_NAME, route_prefix="/")


def serve_forever(config: ReplicaConfig, replicas: int, host: str, port: int, banner: str) -> int:
    """`genlab serve --ray`: join the Ray cluster named by RAY_ADDRESS (or one started with `ray start` on this
    machine, or else a new local one), deploy, and serve until interrupted; then remove the application (a Ray
    started here stops with it)."""
    ray.init(include_dashboard=False, log_to_driver=False)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        deploy(config, replicas, host, port)
        print(banner, file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0
