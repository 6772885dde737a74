"""Model families, one module each; `get_family(name)` imports and returns the class."""

from __future__ import annotations

import importlib

from genlab.registry import MODELS

# family name -> module that registers it (imported on first use, so the CLI starts fast)
FAMILY_MODULES = {
    "diffusion": "genlab.models.diffusion",
    "autoencoder_kl": "genlab.models.autoencoder",
    "gpt": "genlab.models.gpt",
}


def get_family(name: str) -> type:
    """The GenerativeModel subclass registered as `name`."""
    if name in FAMILY_MODULES and name not in MODELS:
        importlib.import_module(FAMILY_MODULES[name])
    return MODELS.get(name)
