"""Registering the ops' kernels as torch custom ops, called cheaply in eager mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def remix_op(name: str, mutates_args: Sequence[str]) -> Callable[[Callable], Callable]:
    """Register fn as torch.ops.remix.<name> (opaque to torch.compile, so compiled graphs and
    CUDA-graph capture keep the call) and return a function that calls the op while compiling
    and fn itself otherwise: the custom-op dispatcher costs about 130 us a call in eager mode,
    more than the kernels it would wrap."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        torch.library.custom_op(f"remix::{name}", mutates_args=tuple(mutates_args))(fn)

        def call(*args: Any, **kwargs: Any) -> None:
            if torch.compiler.is_compiling():
                getattr(torch.ops.remix, name)(*args, **kwargs)
            else:
                fn(*args, **kwargs)

        call.__doc__ = fn.__doc__
        return call

    return register
