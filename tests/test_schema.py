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
        ([[1, "x", 3]], "is not numeric \\(row 0 holds 'x'\\)"),
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
