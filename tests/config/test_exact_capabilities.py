"""The exact pass's refusals come from the capability matrix's `exact` column (issue 27), not from checks of
its own: the methods engine.exact scores, on a single-checkpoint store, with a placement holding the model."""

from __future__ import annotations

import pytest

from engine.config import method_names
from engine.config.capabilities import (
    PLACEMENT_KINDS,
    STORE_KINDS,
    capability_matrix,
    check_capability,
    check_exact_factors,
)
from engine.errors import TributaryError

# What engine.exact implements: one full-width query term preconditioned by nothing (grad_dot), by its norm
# (grad_cos) or by the store's full-width K-FAC/EK-FAC factors (if); written out here, not read from the table.
STREAMED = {"grad_dot", "grad_cos", "if"}


def test_the_exact_column_is_the_streamed_methods_wherever_the_placement_holds_the_store():
    matrix = capability_matrix()
    for method in method_names():
        for placement in PLACEMENT_KINDS:
            for store in STORE_KINDS:
                held = store == "checkpoint" or placement != "zero3"
                expected = held and (method in STREAMED or (method == "tracin" and store != "checkpoint"))
                assert matrix[(method, placement, store, "exact")] == expected, (method, placement, store)


def test_a_method_without_a_streamed_form_is_refused_naming_the_ones_with():
    with pytest.raises(TributaryError, match="method trak has no exact streamed form.*grad_dot, grad_cos, if"):
        check_capability("trak", "single", None, ("exact",))


def test_a_training_run_store_takes_the_final_checkpoint_methods_and_tracin_and_refuses_source_by_name():
    check_capability("if", "single", "training_run", ("exact",))
    check_capability("grad_cos", "device_map", "averaged_run", ("exact",))
    check_capability("tracin", "single", "training_run", ("exact",))  # a grad_dot pass at each checkpoint
    with pytest.raises(TributaryError, match="method source has no exact streamed form.*give --method if"):
        check_capability("source", "single", "training_run", ("exact",))


def test_exact_factors_follow_the_same_column():
    check_exact_factors("single", "checkpoint")
    check_exact_factors("device_map", "checkpoint")
    check_exact_factors(
        "zero3", "checkpoint"
    )  # its ranks run the exact stages in lockstep (tests/exact/test_exact_zero3.py)
    check_exact_factors("single", "training_run")  # fitted at the run's final checkpoint
    check_exact_factors("single", "averaged_run")
    with pytest.raises(TributaryError, match="placement.kind zero3 is not supported with a training-run store yet"):
        check_exact_factors("zero3", "training_run")
