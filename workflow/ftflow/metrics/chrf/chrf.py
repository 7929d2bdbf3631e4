"""chrf: character n-gram F-score (sacrebleu), 0-100.

Scores characters rather than words, so it needs no word segmentation and
suits Chinese poems as well as English. `word_order=2` gives chrF++.
"""

import datasets
import evaluate
from sacrebleu.metrics import CHRF


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus chrF (sacrebleu; character n-grams up to 6, beta 2), 0-100; per example: sentence chrF.",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description="predictions: list of str; references: list of str; word_order: 0 (chrF) or 2 (chrF++)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, word_order=0):
        if not predictions:
            return {"chrf": 0.0, "per_example": []}
        metric = CHRF(word_order=word_order)
        corpus = metric.corpus_score(list(predictions), [list(references)])
        per_example = [metric.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        return {"chrf": corpus.score, "per_example": per_example}
