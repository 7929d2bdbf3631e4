"""rouge: ROUGE-1/2/L F1 with Google's rouge_score.

rouge_score's default tokenizer keeps only [a-z0-9] and so scores Chinese text
as empty; text with CJK characters is tokenized per character instead.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer, tokenize

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class _MixedTokenizer:
    def tokenize(self, text):
        if CJK.search(text):
            return [ch for ch in text if not ch.isspace()]
        return tokenize.tokenize(text, None)


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge_score; per-character for CJK text).",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        types = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(types, tokenizer=_MixedTokenizer())
        per_example = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        out = {t: sum(s[t].fmeasure for s in per_example) / len(per_example) if per_example else 0.0 for t in types}
        out["per_example"] = [s["rougeL"].fmeasure for s in per_example]
        return out
