"""`remix-train study`: every claim's pipeline end to end at the quick preset, and its statistics."""

from __future__ import annotations

import json
import math

import pytest

from remix_infer.train.cli import main
from remix_infer.train.study import STUDY_TASK_NAMES, compare, mean_ci


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert ci["mean"] == 2.0 and ci["n_seeds"] == 3
    assert ci["high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert ci["low"] == pytest.approx(4.0 - ci["high"])
    assert mean_ci([5.0]) == {"mean": 5.0, "low": 5.0, "high": 5.0, "n_seeds": 1}
    assert compare(mean_ci([3.0, 3.1, 3.2]), mean_ci([1.0, 1.1, 1.2])) == "above"
    assert compare(mean_ci([1.0, 1.1, 1.2]), mean_ci([3.0, 3.1, 3.2])) == "below"
    assert compare(mean_ci([1.0, 2.0, 3.0]), mean_ci([1.5, 2.5, 3.5])) == "intervals overlap"


def _intervals(node):
    """Every mean/CI dict in a report subtree."""
    if isinstance(node, dict):
        if "mean" in node and "n_seeds" in node:
            yield node
        else:
            for value in node.values():
                yield from _intervals(value)
    elif isinstance(node, list):
        for value in node:
            yield from _intervals(value)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--preset", "quick", "--out", str(out)]) == 0
    return out, json.loads((out / "study.json").read_text())


def test_quick_study_reports_every_claim_over_seeds(quick_study):
    out, report = quick_study
    claims = report["claims"]
    assert set(claims) == {
        "routing_collapse",
        "equal_parameters",
        "rloo_samples",
        "inference_routing",
    }
    for name, claim in claims.items():
        cis = list(_intervals(claim["summary"]))
        assert cis, name
        for ci in cis:  # every figure is a mean over >= 3 seeds inside its 95% interval
            assert ci["n_seeds"] >= 3
            assert ci["low"] <= ci["mean"] <= ci["high"]
        assert (out / f"{name}.png").stat().st_size > 10_000
    # the runs behind the summaries: one per seed, and the summary is their mean
    for name, runs in claims["equal_parameters"]["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1, 2]
        values = [r["routing"]["top_k"]["exact_match"]["all"] for r in runs]
        summary = claims["equal_parameters"]["summary"][name]
        assert summary["exact_match"]["mean"] == pytest.approx(sum(values) / 3)
        assert set(summary["by_task"]) == set(STUDY_TASK_NAMES)
    assert set(claims["equal_parameters"]["summary"]) == {"remix", "lora_r2", "lora_r8"}
    assert set(claims["rloo_samples"]["summary"]) == {"M=2", "M=4", "M=8"}
    # more samples per sequence, more training work: M = 8 takes more CPU time than M = 2
    rloo = claims["rloo_samples"]["summary"]
    assert rloo["M=8"]["train_cpu_seconds"]["mean"] > rloo["M=2"]["train_cpu_seconds"]["mean"]


def test_quick_study_routing_collapse(quick_study):
    _, report = quick_study
    claim = report["claims"]["routing_collapse"]
    for runs in claim["runs"].values():
        assert all(r["steps"] == [0, 2, 4] for r in runs)
        values = [v for r in runs for v in r["eval_effective_loras"]]
        assert 1.0 <= min(values) and max(values) <= 8.0
    # ReMix's weights are constant: ESS is exactly k in every run, a zero-width interval.
    for ci in claim["summary"]["remix"]["eval_ess"]:
        assert ci == pytest.approx({"mean": 2.0, "low": 2.0, "high": 2.0, "n_seeds": 3})
    # MixLoRA's softmax weights over two selected LoRAs: ESS between 1 and 2.
    mix = [v for r in claim["runs"]["mixlora"] for v in r["eval_ess"]]
    assert all(1.0 < v < 2.0 for v in mix)
    assert claim["verdict"].split(":")[0] in {"weight ESS reproduced", "weight ESS not reproduced"}


def test_quick_study_inference_routings_differ(quick_study):
    _, report = quick_study
    summary = report["claims"]["inference_routing"]["summary"]
    assert set(summary) == {"top_k", "sampled", "random"}
    # a random k of 8 matches the router's top 2 on about 1 in 28 (token, module) pairs;
    # sampling from a router still near its uniform initialisation is close to random too
    assert summary["random"]["top_k_agreement"]["mean"] < 0.2
    assert summary["sampled"]["top_k_agreement"]["mean"] < 0.9
    assert "top_k_agreement" not in summary["top_k"]


def test_study_claims_selector_reuses_the_runs(quick_study, capsys):
    out, full = quick_study
    assert main(["study", "--preset", "quick", "--out", str(out), "--claims", "4"]) == 0
    report = json.loads((out / "study.json").read_text())
    assert list(report["claims"]) == ["inference_routing"]
    # claim 4 alone: the full study's remix runs (out/runs/) are reused, not trained again
    assert report["claims"]["inference_routing"] == full["claims"]["inference_routing"]
    assert report["total_seconds"] < full["total_seconds"] / 4
    assert "inference_routing: top_k" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["study", "--preset", "quick", "--out", str(out), "--claims", "5"])
    assert "expected claims among 1,2,3,4" in capsys.readouterr().err
