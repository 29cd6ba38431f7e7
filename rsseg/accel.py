"""Device-side speed options shared by training and prediction (docs/gpu.md).

- :func:`uses_pinned_transfer`: whether host batches go through pinned memory with
  ``non_blocking`` copies (CUDA devices only);
- :func:`to_channels_last`: NHWC memory layout for 4-D tensors (the layout of tensor-core
  convolutions on GPUs);
- :func:`compile_model`: ``torch.compile`` with the compiler toolchain checked first, and
  :func:`compile_error_types` / :func:`compile_failure` to turn a failed compilation into one line.

Nothing here changes results beyond float rounding: every option is off by default.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from rsseg.errors import UsageError


def uses_pinned_transfer(device: torch.device | str) -> bool:
    """True when batches for ``device`` should be built in pinned host memory and copied with
    ``non_blocking=True``: only a CUDA device on a machine where CUDA works. ``pin_memory`` needs
    a CUDA runtime, and on the CPU a "transfer" is no copy at all, so nothing may change there."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last (NHWC) memory layout when it is 4-D; other ranks unchanged (the
    layout is only defined for 4-D tensors). Values and shape are the same either way."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` (inductor) cannot build code for ``device`` here, or None.

    On the CPU inductor writes and compiles C++ (it needs a C++ compiler, ``$CXX`` or g++); on a
    GPU it generates Triton kernels, which need triton and a C compiler for Triton's launcher.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs triton for CUDA kernels (it ships with CUDA builds of torch)"
        compilers = [os.environ.get("CC"), "gcc", "clang", "cc"]
        if not any(c and shutil.which(c) for c in compilers):
            return "Triton needs a C compiler (gcc or clang, or $CC) to build its kernel launcher"
        return None
    if kind != "cpu":
        return f"rsseg supports --compile on cpu and cuda devices, not {kind}"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()  # inductor's own search ($CXX, then g++); raises if none
    except Exception as exc:  # noqa: BLE001 - any failure here means inductor cannot build
        return f"inductor needs a C++ compiler on the CPU (install g++ or set $CXX): {_first_line(exc)}"
    return None


def compile_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``torch.compile(model)`` (default mode) after checking that inductor can build code for
    ``device``; a missing toolchain is a one-line UsageError now rather than a long traceback at
    the first forward. Compilation itself happens at the first call (and again for each new input
    shape until dynamo marks the shapes dynamic). The selective scan is excluded from tracing (it
    is a hand-written kernel; see docs/gpu.md): each scan call is one graph break.
    """
    reason = compile_unavailable_reason(device)
    if reason is not None:
        raise UsageError(f"--compile cannot run on {torch.device(device).type}: {reason}")
    return torch.compile(model)


def compile_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the compiler failed", not "the model failed": catch them around the
    calls of a compiled model and re-raise :func:`compile_failure`. (A function, so that
    importing rsseg never imports dynamo.)"""
    from torch._dynamo.exc import BackendCompilerFailed

    types: list[type[BaseException]] = [BackendCompilerFailed]
    try:
        from torch._inductor.exc import InductorError

        types.append(InductorError)
    except ImportError:  # older torch: inductor failures arrive as BackendCompilerFailed
        pass
    return tuple(types)


def compile_failure(exc: BaseException) -> UsageError:
    """The one-line error for a compilation that failed at run time."""
    return UsageError(f"torch.compile failed ({_first_line(exc)}); run without --compile")


__all__ = [
    "compile_error_types",
    "compile_failure",
    "compile_model",
    "compile_unavailable_reason",
    "to_channels_last",
    "uses_pinned_transfer",
]
