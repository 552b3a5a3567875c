"""Schema-driven fuzzing of the HTTP API with schemathesis (over Hypothesis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fuzz_no_5xx(schema: Any, call: Callable[[Any], Any], max_examples: int) -> None:
    """Schemathesis cases for every documented operation, valid and invalid (positive and
    negative modes); `call(case)` returns the response, which must not be a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    for operation in schema.get_all_operations():
        op = operation.ok()
        modes = [GenerationMode.POSITIVE]
        if op.method.upper() == "POST":  # the GETs take no input to get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = call(case)
                assert response.status_code < 500, (case.as_curl_command(), response.text)

            check()
