"""bleu: corpus BLEU (sacrebleu); tokenize='zh' for text with Chinese characters."""

import re

import datasets
import evaluate
from sacrebleu.metrics import BLEU

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="BLEU (sacrebleu), 0-100.",
            citation="Papineni et al., 2002. BLEU: a Method for Automatic Evaluation of Machine Translation.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        chinese = any(CJK.search(r) for r in references)
        tokenize = "zh" if chinese else "13a"
        corpus = BLEU(tokenize=tokenize).corpus_score(list(predictions), [list(references)])
        sentence = BLEU(tokenize=tokenize, effective_order=True)
        per_example = [sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        return {"bleu": corpus.score, "per_example": per_example}
