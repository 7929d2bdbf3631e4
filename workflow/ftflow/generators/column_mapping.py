"""The embedded default task: map messy column headers to canonical field names.

Spreadsheets of vehicle-emission measurements arrive with headers in English and
Chinese, abbreviated, with or without units. The task asks a model to return a
JSON object mapping every header it is shown to one canonical field name. It is
generated deterministically from a seed, so the embedded default needs no
download and every run sees the same rows.
"""

from __future__ import annotations

import json
import random

SYSTEM_PROMPT = (
    "Map each spreadsheet column header to its canonical field name. "
    "Answer with one JSON object, headers in the order given."
)

# canonical field -> header spellings seen in the wild (English and Chinese)
HEADER_VARIANTS: dict[str, list[str]] = {
    "vehicle_type": ["Vehicle Type", "veh_type", "VEH. TYPE", "车辆类型", "车型", "type of vehicle"],
    "fuel_type": ["Fuel", "fuel_type", "Fuel Type", "燃料类型", "燃油种类", "FUEL_CAT"],
    "emission_standard": ["Emission Std", "emission standard", "排放标准", "Euro class", "国标阶段", "EMIS_STD"],
    "pollutant": ["Pollutant", "污染物", "pollutant_name", "Species", "污染物种类", "POLL"],
    "emission_factor": ["EF (g/km)", "emission factor", "排放因子", "ef_g_per_km", "排放系数(g/km)", "EF"],
    "speed_kmh": ["Speed (km/h)", "avg speed", "车速", "平均速度(km/h)", "speed_kmh", "SPD"],
    "model_year": ["Model Year", "MY", "年款", "生产年份", "model_year", "year of manufacture"],
    "mileage_km": ["Odometer (km)", "mileage", "行驶里程", "累计里程(km)", "ODO_KM", "km driven"],
    "engine_displacement_l": ["Engine Size (L)", "displacement", "排量(L)", "发动机排量", "ENG_DISP", "cc/1000"],
    "region": ["Region", "地区", "所在城市", "area", "city/region", "REGION_CODE"],
    "test_date": ["Test Date", "检测日期", "date_tested", "测试时间", "DATE", "inspection date"],
    "road_type": ["Road Type", "道路类型", "road class", "道路等级", "RD_TYPE", "link type"],
}

CANONICAL_FIELDS = list(HEADER_VARIANTS)


def _example(rng: random.Random, min_headers: int, max_headers: int) -> dict:
    fields = rng.sample(CANONICAL_FIELDS, rng.randint(min_headers, max_headers))
    headers = [rng.choice(HEADER_VARIANTS[field]) for field in fields]
    answer = json.dumps(dict(zip(headers, fields)), ensure_ascii=False)
    system = SYSTEM_PROMPT
    user = "Headers: " + " | ".join(headers)
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def generate(
    seed: int = 0,
    train: int = 400,
    validation: int = 40,
    test: int = 60,
    min_headers: int = 2,
    max_headers: int = 4,
) -> dict[str, list[dict]]:
    """Return {"train": rows, "validation": rows, "test": rows} of chat rows.

    Splits never share a header combination, so test scores measure mapping
    headers, not recalling whole training rows.
    """
    if not 1 <= min_headers <= max_headers <= len(CANONICAL_FIELDS):
        raise ValueError(
            f"column_mapping: need 1 <= min_headers <= max_headers <= {len(CANONICAL_FIELDS)}, "
            f"got {min_headers}, {max_headers}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in (("test", test), ("validation", validation), ("train", train)):
        rows: list[dict] = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 100 * max(size, 1):
                raise ValueError(f"column_mapping: cannot draw {size} distinct {split} rows")
            row = _example(rng, min_headers, max_headers)
            key = row["messages"][1]["content"]
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
        splits[split] = rows
    return splits
