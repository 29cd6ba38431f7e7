"""State-space building blocks: the selective scan and the 2D Mamba blocks built on it.

- :func:`selective_scan` / :func:`selective_scan_states`: Mamba's S6 scan (mamba-ssm's CUDA
  kernel, a Triton kernel or an exact torch scan; ``RSSEG_SCAN_BACKEND`` = auto | torch | cuda |
  triton).
- :class:`SS2D`, :class:`VSSBlock`, :class:`VSSLayer`: VMamba's four-traversal 2D scan, (B, H, W, C).
- :class:`FourDirectionMamba`: four separately-parameterised Mamba scans, (B, C, H, W) ->
  (B, 4, C, H, W) in the order (right, left, down, up).

Nothing here imports mamba-ssm at import time. See docs/ssm.md.
"""

from rsseg.models.ssm.directional import FourDirectionMamba
from rsseg.models.ssm.scan import (
    BACKENDS,
    ENV_VAR,
    kernel_unsupported_reason,
    requested_backend,
    resolve_backend,
    selective_scan,
    selective_scan_states,
    triton_unsupported_reason,
)
from rsseg.models.ssm.scan_orders import DIRECTIONS, from_sequences, merge_sequences, to_sequences
from rsseg.models.ssm.ss2d import SS2D, VSSBlock, VSSLayer

__all__ = [
    "BACKENDS",
    "DIRECTIONS",
    "ENV_VAR",
    "SS2D",
    "FourDirectionMamba",
    "VSSBlock",
    "VSSLayer",
    "from_sequences",
    "kernel_unsupported_reason",
    "merge_sequences",
    "requested_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_states",
    "to_sequences",
    "triton_unsupported_reason",
]
