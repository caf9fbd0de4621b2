"""How much of a validation set an evaluation reads (EvalCoverage): examples of fine-tuning batches,
tokens of pretraining windows; only a partial evaluation adds labels to its metrics."""

import numpy as np

from lmforge.data.sampling import EvalCoverage, ExampleBatches
from lmforge.data.windows import EvalWindows, window_coverage


def test_labels_only_for_a_partial_evaluation():
    assert EvalCoverage(65, 65, "examples").labels("val") == {}
    assert EvalCoverage(208, 1039, "examples").labels("val") == {
        "val_partial": True, "val_examples": 208, "val_examples_total": 1039}
    assert EvalCoverage(200, 1447, "examples").labels("generation") == {
        "generation_partial": True, "generation_examples": 200, "generation_examples_total": 1447}
    assert EvalCoverage(81920, 130411, "tokens").describe() == "81,920 of 130,411 tokens"


def test_example_batches_coverage_matches_what_all_batches_holds():
    source = ExampleBatches(65, lambda rows: rows, micro_batch_size=8, micro_batches_per_step=1, seed=0, shuffle=False)
    for limit, evaluated in ((None, 65), (1000, 65), (9, 65), (8, 64), (2, 16)):
        assert source.coverage(limit) == EvalCoverage(evaluated, 65, "examples")
        assert sum(len(b) for b in source.all_batches(limit)) == evaluated


def test_window_coverage_counts_each_token_once():
    assert window_coverage(np.array([0, 10, 20]), 5, 100) == EvalCoverage(15, 100, "tokens")
    assert window_coverage(np.array([0, 3, 3, 6]), 5, 100) == EvalCoverage(11, 100, "tokens")  # overlaps once
    tokens = np.zeros(1000, dtype=np.uint16)
    # 2 batches x 4 windows of 65 tokens spread over 1000 tokens: 520 read
    assert EvalWindows(tokens, 64, 4, 2).coverage() == EvalCoverage(520, 1000, "tokens")
    # enough windows to overlap: the whole split, so the evaluation is not partial
    assert not EvalWindows(tokens, 64, 4, 20).coverage().partial
