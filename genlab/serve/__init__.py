"""`genlab serve`: an OpenAI-compatible HTTP API over a durable SQLite job queue with batching.

- `store.py`: the SQLite (WAL) store of jobs and outputs, and the atomic claim of a batch of jobs;
- `pool.py`: the model folders of the served folder, loaded on first use and unloaded least-recently-used;
- `jobs.py`: the job kinds (kind -> validate + run) and the worker loop every worker runs;
- `images.py`: the image kinds (generations, edits) and their OpenAI-shaped responses;
- `limits.py`: request bounds, API keys (sha256, compared in constant time), the body-size guard;
- `app.py`: the FastAPI application.
"""
