"""The safe --where / --index expressions: exact filtering, and everything else refused."""

from __future__ import annotations

import numpy as np
import pytest

from terrasam.errors import TerrasamError
from terrasam.where import parse

COLS = {
    "area_m2": np.array([10.0, 60.0, 100.0, np.nan, 51.0]),
    "ndvi_mean": np.array([0.1, 0.1, 0.5, 0.1, 0.19]),
    "prompt_type": np.array(["point", "box", "point", "text", "box"], dtype=object),
}
N = 5


def keep(text):
    return parse(text, COLS, what="--where", condition=True,
                 text_columns=["prompt_type"]).mask(COLS, N).tolist()


@pytest.mark.parametrize("text, expected", [
    ("area_m2 > 50 and ndvi_mean < 0.2", [False, True, False, False, True]),
    ("area_m2 > 50 AND NOT ndvi_mean >= 0.2", [False, True, False, False, True]),
    ("area_m2 <= 10 or area_m2 >= 100", [True, False, True, False, False]),
    ("50 < area_m2 < 100", [False, True, False, False, True]),
    ("prompt_type = 'box'", [False, True, False, False, True]),
    ("prompt_type in ('point', 'text')", [True, False, True, True, False]),
    ("prompt_type not in ['point']", [False, True, False, True, True]),
    ("sqrt(area_m2) * 2 > 14.2", [False, True, True, False, True]),
    ("isnan(area_m2)", [False, False, False, True, False]),
    ("not (area_m2 > 50)", [True, False, False, True, False]),  # NaN > 50 is False
    ("area_m2 % 20 == 0", [False, True, True, False, False]),
    ("max(area_m2, 70) == 70", [True, True, False, False, True]),
])
def test_filters_keep_exactly_the_rows_that_satisfy_them(text, expected):
    assert keep(text) == expected


def test_the_names_an_expression_reads():
    assert parse("sqrt(area_m2) > 2 and prompt_type == 'box'", COLS).names == \
        {"area_m2", "prompt_type"}


def test_an_unknown_column_names_the_known_ones():
    with pytest.raises(TerrasamError) as err:
        keep("area > 50")
    message = str(err.value)
    assert "unknown column 'area'" in message
    assert "area_m2, ndvi_mean, prompt_type" in message and message.count(".") == 1


@pytest.mark.parametrize("text, reason", [
    ("__import__('os').system('true')", "attribute"),
    ("__import__('os')", "calls __import__"),
    ("area_m2.__class__ == 1", "attribute"),
    ("COLS['x'] > 1", "subscript"),
    ("(lambda: 1)() == 1", "lambda"),
    ("[a for a in area_m2] == 1", "not allowed"),
    ("open('f') == 1", "calls open"),
    ("area_m2 > 50 if 1 else 0", "if/else"),
    ("area_m2 >", "cannot read"),
    ("area_m2 + 1", "must be a condition"),
    ("prompt_type + 1 > 2", "holds text"),
    ("area_m2 in area_m2", "'in' takes a list"),
    ("sqrt(area_m2, 2) > 1", "takes 1 argument"),
    ("area_m2 > b'x'", "constant"),
    ("", "is empty"),
])
def test_anything_outside_the_whitelist_is_refused_before_running(text, reason):
    with pytest.raises(TerrasamError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        keep(text)


def test_a_value_expression_for_band_indexes():
    bands = {"b1": np.array([1.0, 2.0, 0.0]), "b4": np.array([3.0, 2.0, 0.0])}
    expr = parse("(b4 - b1) / (b4 + b1)", ["b1", "b4"], what="--index ndvi")
    out = expr.evaluate(bands)
    assert out[:2].tolist() == [0.5, 0.0] and np.isnan(out[2])  # 0/0: NaN, no warning
