"""The bad-input matrix as a whole: every row has its own id across the front ends' files."""

from tests import (
    test_bad_inputs_api,
    test_bad_inputs_data,
    test_bad_inputs_deepspeed,
    test_bad_inputs_resume,
    test_bad_inputs_yaml,
)

CASES = [
    *test_bad_inputs_api.CASES,
    *test_bad_inputs_yaml.CASES,
    *test_bad_inputs_data.CASES,
    *test_bad_inputs_deepspeed.CASES,
    *test_bad_inputs_resume.CASES,
]


def test_matrix_size_and_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30
