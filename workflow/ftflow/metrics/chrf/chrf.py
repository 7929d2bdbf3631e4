"""chrf: character n-gram F-score (sacrebleu), suited to Chinese and other unsegmented text."""

import datasets
import evaluate
from sacrebleu.metrics import CHRF


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="chrF (sacrebleu), 0-100.",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        metric = CHRF()
        corpus = metric.corpus_score(list(predictions), [list(references)])
        per_example = [metric.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        return {"chrf": corpus.score, "per_example": per_example}
