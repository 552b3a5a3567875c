"""Run a module or script in a fresh Python with pydantic, vLLM and transformers unimportable:
the GPU machine has torch and Triton alone, so what must run there is tested so."""

from __future__ import annotations

import sys

BLOCKED = ("pydantic", "vllm", "transformers")
# A meta-path finder ahead of every other refuses BLOCKED; then the target runs as __main__.
_RUN_BLOCKED = f"""
import os, runpy, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError("blocked for this test: " + name)
        return None

sys.meta_path.insert(0, Blocker())
target = sys.argv.pop(1)
if target.endswith(".py"):
    sys.argv[0] = target
    sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python target` does
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def blocked_command(target: str, *args: str) -> list[str]:
    """argv that runs `target` (a module name, or a script path) with BLOCKED refused."""
    return [sys.executable, "-c", _RUN_BLOCKED, target, *args]
