import numpy as np
import pytest

from device_agent.errors import InputError
from device_agent.schema import InputSchema

SCHEMA = InputSchema("X", ("a", "b", "c"))


def test_accepts_lists_and_arrays_and_casts():
    assert SCHEMA.check([[1, 2, 3]]).dtype == np.float32
    assert SCHEMA.check([1, 2, 3]).shape == (1, 3)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[1, 2]], "has 2 columns, the model takes 3; send rows of 3 values in the order a, b, c"),
        ([[1, "x", 3]], "row 0 column 'b' holds the string 'x', which is not numeric"),
        (
            [[1, 2, 3], [1, "3.5", 3]],
            "row 1 column 'b' holds the string '3.5', which is not numeric; send JSON numbers, not strings",
        ),
        (["1", 2, 3], "row 0 column 'a' holds the string '1'"),
        (
            [[1, 2, 3], [1, 2]],
            "row 1 has 2 values, the model takes 3; send every row as a list of 3 numbers in the order a, b, c",
        ),
        ([[1, 2, 3], 5], "row 1 is the value 5, not a list of values"),
        ([[1, {"z": 1}, 3]], "row 0 column 'b' holds an object {\"z\": 1}, which is not numeric"),
        ({"a": 1, "b": 2, "c": 3}, "is one object, not a list of rows; send a list of rows"),
        ("oops", "is not numeric: it is the string 'oops'"),
        ([[1, np.nan, 3]], "1 missing value\\(s\\), first at row 0 column 'b', and the model has no imputer"),
        ([[1, np.inf, 3]], "row 0 column 'b' is infinite"),
        (np.zeros((0, 3)), "has no rows"),
        ([], "has no rows"),
        ([[True, 2, 3]], "holds true/false where numbers belong"),
        (np.zeros((2, 3, 1)), "has shape \\(2, 3, 1\\)"),
    ],
)
def test_refusals_name_the_problem(rows, message):
    with pytest.raises(InputError, match=message):
        SCHEMA.check(rows)


def test_nan_allowed_when_the_model_imputes():
    schema = InputSchema("X", ("a", "b"), allow_nan=True)
    assert np.isnan(schema.check([[np.nan, 1]])[0, 0])


def test_round_trip():
    assert InputSchema.from_dict(SCHEMA.to_dict()) == SCHEMA


def test_objects_keyed_by_feature_name_are_put_in_schema_order():
    rows = SCHEMA.check([{"c": 3, "a": 1, "b": 2}, {"a": 4, "b": 5, "c": 6}])
    assert rows.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"a": 1, "b": 2}], "row 0 lacks 'c'; send the keys 'a', 'b', 'c' \\(null for a missing value\\)"),
        ([{"a": 1, "b": 2, "c": 3, "label": 1}], "row 0 has keys the model does not know: 'label'"),
        ([{"a": 1, "b": 2, "c": 3}, [1, 2, 3]], "row 1 is a list \\[1, 2, 3\\] but row 0 is an object"),
        ([{"a": 1, "b": "2", "c": 3}], "row 0 column 'b' holds the string '2'"),
    ],
)
def test_object_rows_need_exactly_the_models_keys(rows, message):
    with pytest.raises(InputError, match=message):
        SCHEMA.check(rows)


def test_json_null_is_a_missing_value():
    with pytest.raises(InputError, match="1 missing value"):
        SCHEMA.check([[1, None, 3]])
    assert np.isnan(InputSchema("X", ("a", "b"), allow_nan=True).check([{"a": None, "b": 1}])[0, 0])


def test_a_schema_or_spec_that_cannot_be_served_is_a_schema_error_naming_the_fix():
    from device_agent.errors import ProtocolError, SchemaError
    from device_agent.outputs import OutputSpec
    from device_agent.protocol import Topics

    with pytest.raises(SchemaError, match="feature names repeat \\('a'\\); give every column its own name"):
        InputSchema("X", ("a", "b", "a"))
    with pytest.raises(SchemaError, match="input dtype 'float16' is not supported; export the model with one of"):
        InputSchema("X", ("a",), dtype="float16")
    with pytest.raises(SchemaError, match="unknown task 'ranking'"):
        OutputSpec("ranking")
    with pytest.raises(ProtocolError, match="cannot be an MQTT topic level"):
        Topics("fleet/a", "dev")
