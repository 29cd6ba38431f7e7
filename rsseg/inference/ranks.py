"""Which device a ``torchrun`` rank predicts on.

torchrun sets ``LOCAL_RANK`` (the rank's index on its own node) and ``LOCAL_WORLD_SIZE``; with
``--device cuda`` every rank takes ``cuda:LOCAL_RANK``, so N processes on a node with N GPUs use
all N, on every node of a multi-node launch. A list (``cuda:0,cuda:2`` or ``cuda:0,2``) names the
node's GPUs to share out, one per local rank.
"""

from __future__ import annotations

import os

from rsseg.errors import UsageError


def local_rank() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """The device this process uses for ``--device``: a plain ``cuda`` becomes
    ``cuda:LOCAL_RANK``; a comma-separated list gives local rank k its k-th entry; anything else
    (``cpu``, an explicit ``cuda:1``) is kept."""
    text = device.strip()
    rank, ranks = local_rank()
    if "," in text:
        entries = [e.strip() for e in text.split(",") if e.strip()]
        kind = entries[0].split(":")[0]
        devices = [e if ":" in e or not e.isdigit() else f"{kind}:{e}" for e in entries]
        if ranks > len(devices):
            raise UsageError(f"--device lists {len(devices)} device(s) but this node runs "
                             f"{ranks} processes; list one device per process")
        return devices[rank]
    if text == "cuda" and ranks > 1:
        return f"cuda:{rank}"
    return text
