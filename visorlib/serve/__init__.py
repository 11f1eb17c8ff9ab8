"""``visorlib serve``: an OpenAI-compatible server where every request picks its VISOR budget.

* :mod:`.protocol` — the request, checked field by field, and the OpenAI error body;
* :mod:`.media` — image parts to images (data URLs; local paths under ``--media-root``; remote
  hosts only when allowed);
* :mod:`.prepare` — a request to model inputs, its configuration and token budget;
* :mod:`.batch` — the running decode batch's KV cache: rows join and leave between steps;
* :mod:`.scheduler` — the one thread that owns the model (continuous batching);
* :mod:`.app` — the FastAPI routes; :mod:`.cli` — the ``visorlib serve`` command.

FastAPI and uvicorn come with the optional extra: ``pip install 'visorlib[serve]'``.
"""
