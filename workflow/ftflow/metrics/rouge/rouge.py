"""rouge: ROUGE-1, ROUGE-2 and ROUGE-L F1 with Google's rouge_score.

rouge_score's default tokenizer keeps only runs of [a-z0-9], so Chinese or
Japanese text scores as empty (0 for every pair). The tokenizer here makes
each Han or kana character one token (there are no spaces between words to
split on) and keeps runs of any other letters and digits as lowercased words;
on plain ASCII text it gives exactly rouge_score's default tokens.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

# Han (CJK unified ideographs, extension A, compatibility) and Japanese kana.
CHARACTER_SCRIPTS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{CHARACTER_SCRIPTS}]|[^\W_{CHARACTER_SCRIPTS}]+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class CharacterAwareTokenizer:
    """The `tokenize(text)` object rouge_score accepts in place of its default."""

    def tokenize(self, text):
        return TOKEN.findall(text.lower())


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge_score), averaged over examples, 0-1; "
            "Han and kana characters are one token each.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharacterAwareTokenizer())
        scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        out = {name: sum(s[name].fmeasure for s in scores) / len(scores) if scores else 0.0 for name in ROUGE_TYPES}
        out["per_example"] = [s["rougeL"].fmeasure for s in scores]
        return out
