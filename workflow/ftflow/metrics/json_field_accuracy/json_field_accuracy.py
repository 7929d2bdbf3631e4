"""json_field_accuracy: per-field and overall accuracy of JSON-object outputs.

Each key of the reference object is a field. A prediction that is not a JSON
object scores every field wrong and is counted in `invalid_json`.
"""

import json

import datasets
import evaluate


class JsonFieldAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy per JSON field and over all fields; invalid JSON counts as wrong.",
            citation="",
            inputs_description="predictions: list of str (JSON objects); references: list of str (JSON objects)",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        correct, total, invalid = 0, 0, 0
        per_field = {}
        per_example = []
        for prediction, reference in zip(predictions, references):
            ref = json.loads(reference)
            try:
                pred = json.loads(prediction.strip())
                if not isinstance(pred, dict):
                    raise ValueError("not an object")
            except ValueError:
                pred = None
                invalid += 1
            hits = 0
            for key, value in ref.items():
                hit = pred is not None and key in pred and pred[key] == value
                hits += hit
                field = per_field.setdefault(str(key), [0, 0])
                field[0] += hit
                field[1] += 1
            correct += hits
            total += len(ref)
            per_example.append(hits / len(ref) if ref else 1.0)
        return {
            "json_field_accuracy": correct / total if total else 0.0,
            "invalid_json": invalid,
            "invalid_json_rate": invalid / len(references) if references else 0.0,
            "per_field": {k: v[0] / v[1] for k, v in sorted(per_field.items())},
            "per_example": per_example,
        }
