"""`remix-train study`: the claims' pipeline end to end at the quick preset, and its statistics."""

from __future__ import annotations

import json
import math

import pytest

from remix_infer.train.cli import main
from remix_infer.train.study import mean_ci


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert ci["mean"] == 2.0
    assert ci["high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert ci["low"] == pytest.approx(4.0 - ci["high"])
    assert mean_ci([5.0]) == {"mean": 5.0, "low": 5.0, "high": 5.0}


def test_quick_study_measures_routing_collapse_over_seeds(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--preset", "quick", "--out", str(out)]) == 0
    report = json.loads((out / "study.json").read_text())
    claim = report["claims"]["routing_collapse"]
    assert set(claim["runs"]) == {"mixlora", "remix"}
    for method, runs in claim["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1, 2]
        assert all(r["steps"] == [0, 2, 4] for r in runs)
        summary = claim["summary"][method]
        for i in range(3):  # the summary is the seeds' mean
            values = [r["eval_effective_loras"][i] for r in runs]
            assert summary["eval_effective_loras"][i]["mean"] == pytest.approx(sum(values) / 3)
            assert 1.0 <= min(values) and max(values) <= 8.0
    # ReMix's weights are constant: ESS is exactly k in every run, a zero-width interval.
    for ci in claim["summary"]["remix"]["eval_ess"]:
        assert ci == pytest.approx({"mean": 2.0, "low": 2.0, "high": 2.0})
    # MixLoRA's softmax weights over two selected LoRAs: ESS between 1 and 2, seeds differ.
    mix = [v for r in claim["runs"]["mixlora"] for v in r["eval_ess"]]
    assert all(1.0 < v < 2.0 for v in mix)
    assert claim["verdict"].split(":")[0] in {"weight ESS reproduced", "weight ESS not reproduced"}
    assert claim["verdict"] in capsys.readouterr().out
    assert (out / "routing_collapse.png").stat().st_size > 10_000
