"""A fast subset of benchmarks/diagnosis_corpus.py: healthy models stay quiet, sick ones get their cause.

Each case trains for fewer steps than in the benchmark. Its ground truth is
measured by the benchmark's own `GradientTape` probe, independently of
keras-vg's records; the test checks that the truth holds (the case is what it
claims to be) and then keras-vg's verdict, on the records kept at every step
and at every tenth, as `GradientMonitor(every=10)` would write them.
"""

import dataclasses
import importlib.util
import pathlib

import pytest

from keras_vg import detect
from keras_vg.reader import read_run

pytestmark = pytest.mark.fit

BENCHMARK = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "diagnosis_corpus.py"
STEPS = 150


def _corpus():
    spec = importlib.util.spec_from_file_location("diagnosis_corpus", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _corpus()
FAST = [name for name, case in corpus.CASES.items() if case.fast]


def test_the_fast_subset_has_healthy_and_sick_cases_of_several_kinds():
    causes = [corpus.CASES[name].cause for name in FAST]
    assert causes.count("healthy") >= 3 and len(set(causes) - {"healthy"}) >= 3


@pytest.mark.parametrize("name", FAST)
def test_case(name, tmp_path):
    case = dataclasses.replace(corpus.CASES[name], steps=STEPS)
    measured = corpus.record(case, str(tmp_path))
    assert corpus.truth_holds(case, measured), measured
    run = read_run(tmp_path)
    for every in (1, 10):
        verdict = corpus.judge(case, run, every)
        assert verdict["ok"], (every, verdict["kinds"], verdict["remedies"], verdict["diagnosis"].text())
    # The monitor's live warnings (its alert events) are the report's episodes: same rules, same summary.
    alerts = sorted(event["step"] for event in run.events() if event["kind"] == "alert")
    assert alerts == sorted(e.first_step for e in detect.find_episodes(detect.classify(run)))
