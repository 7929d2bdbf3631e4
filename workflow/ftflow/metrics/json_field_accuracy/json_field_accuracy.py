"""json_field_accuracy: per-field and overall accuracy of JSON-object outputs, 0-1.

Every key of a reference object is one field to get right. A prediction that
does not parse as a JSON object gets every field of its reference wrong and is
counted in `invalid_json`. Keys a prediction adds beyond its reference are not
penalised. Values compare as JSON values: 1 equals 1.0, but true does not
equal 1 and "1" does not equal 1.
"""

import json

import datasets
import evaluate


def same_value(a, b):
    """JSON equality; Python's own == would take True for 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def parse_object(text):
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class JsonFieldAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy per JSON field and over all fields of the references; invalid JSON counts as wrong.",
            citation="",
            inputs_description="predictions: list of str (JSON objects); references: list of str (JSON objects)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        right, total, invalid = 0, 0, 0
        per_field = {}  # field -> [right, seen]
        per_example = []
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            expected = parse_object(reference)
            if expected is None:
                raise ValueError(f"reference {index} is not a JSON object: {reference[:80]!r}")
            got = parse_object(prediction)
            invalid += got is None
            hits = 0
            for key, value in expected.items():
                hit = got is not None and key in got and same_value(got[key], value)
                hits += hit
                counts = per_field.setdefault(key, [0, 0])
                counts[0] += hit
                counts[1] += 1
            right += hits
            total += len(expected)
            per_example.append(hits / len(expected) if expected else float(got is not None))
        return {
            "json_field_accuracy": right / total if total else 0.0,
            "invalid_json": invalid,
            "invalid_json_rate": invalid / len(references) if references else 0.0,
            "per_field": {key: counts[0] / counts[1] for key, counts in sorted(per_field.items())},
            "per_example": per_example,
        }
