"""Metrics of generated text against references: BLEU and chrF (sacrebleu), ROUGE-1/2/L
(rouge-score, F-measure), exact match. All on a 0-100 scale, corpus level (BLEU, chrF) or the mean
over examples (ROUGE, exact match), as the libraries define them."""

from __future__ import annotations

from typing import Sequence

from lmforge.errors import LMForgeError


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"} of predictions vs one reference each."""
    if len(predictions) != len(references):
        raise LMForgeError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise LMForgeError("no references to score against")
    import sacrebleu
    from rouge_score import rouge_scorer

    preds, refs = list(predictions), list(references)
    bleu = sacrebleu.corpus_bleu(preds, [refs]).score
    chrf = sacrebleu.corpus_chrf(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        for k, s in scorer.score(r, p).items():
            sums[k] += s.fmeasure
    n = len(refs)
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs))
    return {"bleu": bleu, "chrf": chrf, **{k: 100.0 * v / n for k, v in sums.items()}, "exact_match": 100.0 * exact / n}
