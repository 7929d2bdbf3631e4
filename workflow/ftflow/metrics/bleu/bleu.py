"""bleu: corpus BLEU with sacrebleu, 0-100.

sacrebleu's default tokenizer (13a) splits on spaces and punctuation, so a
line of Chinese is one "word" and scores 0 unless it matches whole. When any
reference holds Han characters the `zh` tokenizer is used instead (each Han
character a token, other text as 13a). `tokenize=` overrides the choice.
"""

import re

import datasets
import evaluate
from sacrebleu.metrics import BLEU

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def pick_tokenizer(references):
    return "zh" if any(HAN.search(r) for r in references) else "13a"


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU (sacrebleu), 0-100; per example: sentence BLEU with effective order.",
            citation="Papineni et al., 2002. BLEU: a Method for Automatic Evaluation of Machine Translation.",
            inputs_description="predictions: list of str; references: list of str; tokenize: sacrebleu tokenizer name or None (auto)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, tokenize=None):
        if not predictions:
            return {"bleu": 0.0, "per_example": []}
        tokenize = tokenize or pick_tokenizer(references)
        corpus = BLEU(tokenize=tokenize).corpus_score(list(predictions), [list(references)])
        # effective_order: a short sentence without any matching 4-gram is not scored 0 outright
        sentence = BLEU(tokenize=tokenize, effective_order=True)
        per_example = [sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        return {"bleu": corpus.score, "per_example": per_example}
