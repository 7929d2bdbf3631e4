"""ftflow's task metrics, loaded by path as `evaluate` modules, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from ftflow import config
from ftflow.metrics import NAMES, compute


def test_every_metric_the_config_accepts_is_shipped():
    assert set(NAMES) == set(config.METRICS)


# --------------------------------------------------------------------------- exact_match


def test_exact_match_compares_json_as_values_and_text_as_stripped_text():
    out = compute(
        "exact_match",
        predictions=['{ "b": 2,  "a": "x" }', "  Paris\n", "paris", '{"a": "x"}', "not json"],
        references=['{"a": "x", "b": 2}', "Paris", "Paris", '{"a": "x", "b": 2}', '{"a": 1}'],
    )
    assert out["per_example"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert out["exact_match"] == pytest.approx(2 / 5)


# --------------------------------------------------------------------------- json_field_accuracy


def test_json_field_accuracy_per_field_overall_and_invalid():
    references = [json.dumps({"a": 1, "b": "x"}), json.dumps({"a": 2, "b": "y"}), json.dumps({"a": 3, "b": "z"})]
    predictions = [
        '{"a": 1.0, "b": "wrong", "extra": 5}',  # a right (1 == 1.0), b wrong; extra keys cost nothing
        "Sure! here is the JSON",  # invalid: both fields wrong
        '["a", 3]',  # valid JSON but not an object: invalid too
    ]
    out = compute("json_field_accuracy", predictions=predictions, references=references)
    assert out["per_field"] == {"a": pytest.approx(1 / 3), "b": 0.0}
    assert out["json_field_accuracy"] == pytest.approx(1 / 6)
    assert out["invalid_json"] == 2
    assert out["invalid_json_rate"] == pytest.approx(2 / 3)
    assert out["per_example"] == [0.5, 0.0, 0.0]


def test_json_field_accuracy_compares_json_types_strictly():
    references = [json.dumps({"flag": True, "n": 1, "s": "1", "nested": {"k": [1, 2]}})]
    out = compute(
        "json_field_accuracy",
        predictions=['{"flag": 1, "n": true, "s": 1, "nested": {"k": [1, 2]}}'],
        references=references,
    )
    assert out["per_field"] == {"flag": 0.0, "n": 0.0, "s": 0.0, "nested": 1.0}


def test_json_field_accuracy_names_a_reference_that_is_not_an_object():
    with pytest.raises(ValueError, match="reference 1 is not a JSON object"):
        compute("json_field_accuracy", predictions=["{}", "{}"], references=['{"a": 1}', "plain text"])


# --------------------------------------------------------------------------- rouge


def test_rouge_on_english_matches_hand_counts():
    out = compute("rouge", predictions=["The cat sat."], references=["the cat sat on the mat"])
    # unigrams: 3 of 3 predicted appear in the 6 of the reference -> P 1, R 1/2
    assert out["rouge1"] == pytest.approx(2 / 3)
    # bigrams: 2 of 2 predicted, 5 in the reference -> P 1, R 2/5
    assert out["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert out["rougeL"] == pytest.approx(2 / 3)  # longest common subsequence: 3 tokens
    assert out["per_example"] == [pytest.approx(2 / 3)]


def test_rouge_tokenizes_chinese_per_character():
    # rouge_score's own tokenizer drops every Chinese character and scores this 0
    out = compute("rouge", predictions=["床前明月光"], references=["床前明月光，疑是地上霜。"])
    # 5 characters predicted, all among the reference's 10 (punctuation is not a token)
    assert out["rouge1"] == pytest.approx(2 * 0.5 / 1.5)
    assert out["rougeL"] == pytest.approx(2 / 3)


def test_rouge_mixed_script_keeps_latin_words_whole():
    # tokens: [ef, g, km, 排, 放] vs [ef, 排, 放, 因, 子]: 3 shared of 5 and 5
    out = compute("rouge", predictions=["EF (g/km) 排放"], references=["EF 排放因子"])
    assert out["rouge1"] == pytest.approx(3 / 5)


# --------------------------------------------------------------------------- bleu


def test_bleu_on_english_matches_hand_counts():
    out = compute("bleu", predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert out["bleu"] == pytest.approx(expected, abs=1e-6)
    assert out["per_example"] == [pytest.approx(expected, abs=1e-6)]


def test_bleu_splits_chinese_into_characters():
    out = compute("bleu", predictions=["床前明月"], references=["床前明月光"])
    # every n-gram of the 4 predicted characters matches; brevity penalty exp(1 - 5/4)
    assert out["bleu"] == pytest.approx(100 * math.exp(1 - 5 / 4), abs=1e-6)


def test_bleu_identical_is_100_and_disjoint_is_0():
    out = compute("bleu", predictions=["a b c d e", "v w x y z"], references=["a b c d e", "q r s t u"])
    assert out["per_example"] == [pytest.approx(100.0), pytest.approx(0.0)]


# --------------------------------------------------------------------------- chrf


def test_chrf_matches_hand_counts():
    out = compute("chrf", predictions=["ab"], references=["abc"])
    # orders with n-grams on both sides: 1 (P 1, R 2/3) and 2 (P 1, R 1/2);
    # averaged P 1, R 7/12; F-beta with beta 2: 5 P R / (4 P + R) = 7/11
    assert out["chrf"] == pytest.approx(100 * 7 / 11)


def test_chrf_ignores_spaces_and_scores_chinese():
    out = compute("chrf", predictions=["床前 明月光", "白日依山尽"], references=["床前明月光", "黄河入海流"])
    assert out["per_example"] == [pytest.approx(100.0), pytest.approx(0.0)]


# --------------------------------------------------------------------------- config agreement


@pytest.mark.parametrize("name", NAMES)
def test_the_config_knows_every_number_a_metric_reports(name):
    reference = '{"a": 1}' if name == "json_field_accuracy" else "the cat sat"
    out = compute(name, predictions=[reference], references=[reference])
    numbers = {key for key, value in out.items() if isinstance(value, (int, float))}
    assert numbers == set(config.METRIC_OUTPUTS[name])


def _resolve(eval_section: dict, metrics: list[str], kind: str = "chat"):
    dataset = {"source": "generator:column_mapping", "kind": kind, "metrics": metrics}
    raw = {
        "models": {"m": {"path": "model"}},
        "datasets": {"d": dataset},
        "defaults": {"model": "m", "dataset": "d"},
        "experiments": {"x": {"eval": eval_section}},
    }
    return config.build_plan(raw, check_schema=False).experiments["x"].eval


def test_primary_metric_defaults_to_the_first_metrics_main_number():
    assert _resolve({}, ["rouge", "chrf"]).primary_metric == "rougeL"
    assert _resolve({}, []).primary_metric == "eval_loss"
    assert _resolve({"primary_metric": "invalid_json"}, ["json_field_accuracy"]).primary_metric == "invalid_json"


def test_a_primary_metric_no_metric_reports_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.eval\.primary_metric: 'rouge' is not a number"):
        _resolve({"primary_metric": "rouge"}, ["rouge"])


def test_task_metrics_on_a_raw_text_dataset_are_a_config_error():
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.eval\.metrics: dataset 'd' is raw text"):
        _resolve({}, ["chrf"], kind="text")
