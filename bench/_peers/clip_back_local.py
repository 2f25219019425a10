"""``clip-retrieval back`` bound to 127.0.0.1 (its code calls Flask's ``app.run(host="0.0.0.0", ...)``).

Run with the clip-retrieval venv's Python, with the same arguments as ``clip-retrieval back``::

    /work/peers/clip-retrieval/bin/python bench/_peers/clip_back_local.py --port 1234 --indices_paths X.json ...

Only the bind address changes (Flask's ``run`` is wrapped); the server, its threads and its handlers are
clip-retrieval's own. Torch's intra-op threads follow ``OMP_NUM_THREADS`` like every system in the benchmark.
"""

from __future__ import annotations

import os

import flask
import torch

_run = flask.Flask.run


def _run_loopback(self, host=None, port=None, *args, **kwargs):  # type: ignore[no-untyped-def]
    return _run(self, "127.0.0.1", port, *args, **kwargs)


flask.Flask.run = _run_loopback  # type: ignore[method-assign]

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import fire
    from clip_retrieval.clip_back import clip_back

    fire.Fire(clip_back)
