"""exact_match: the prediction equals the reference, 0-1.

References that parse as JSON are compared as JSON values, so key order and
whitespace do not matter; other references are compared as text with leading
and trailing whitespace stripped (case and inner spacing count).
"""

import json

import datasets
import evaluate


def canonical(text):
    """('json', canonical dump) when `text` parses as JSON, else ('text', stripped text)."""
    text = text.strip()
    try:
        return "json", json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return "text", text


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference (as JSON values when the reference is JSON).",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for prediction, reference in zip(predictions, references):
            kind, expected = canonical(reference)
            got = canonical(prediction)[1] if kind == "json" else prediction.strip()
            scores.append(float(got == expected))
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "per_example": scores}
