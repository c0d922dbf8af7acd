"""The core's duration parser reads exactly what Composer's `Time.from_timestring` reads (wall-clock
strings aside), without importing Composer."""

import subprocess
import sys

import pytest
from composer.core import Time

from prores_algo.integrations.composer.time import parse_time
from prores_algo.timing import Duration, parse_duration

ACCEPTED = [
    '24000ba', '0.1dur', '1dur', '5e8tok', '1e6sp', '2ep', '3iter', '10sec', '1.0ba', '+5ba', '-3ba',
    ' 5ba', '5 ba', '.5dur', '5.dur', '1E3tok', '0ba', '1e-2dur', '007ba', '5BA', '2Dur', '1_000ba',
]  # fmt: skip
# Composer reads these as wall-clock durations (its timedelta parser: '' is 0 s, '5' is 50 s); the core
# counts training progress only and refuses them, as the other refused strings
WALL_CLOCK = ['', '5', '1h30m']
REFUSED = [
    'ba', 'soon', '2.5ba', '1e-2ba', 'nan', 'nanba', 'infba', '5 b a', '5baba', '1/2dur',
    '5 bat', '0x10ba',
]  # fmt: skip


def _composer(text):
    try:
        t = Time.from_timestring(text)
    except (ValueError, TypeError, OverflowError):
        return None
    return (t.value, t.unit.value)


@pytest.mark.parametrize('text', ACCEPTED + REFUSED + WALL_CLOCK)
def test_same_grammar_as_composer(text):
    try:
        d = parse_duration(text, 'field')
        ours = (d.value, d.unit)
    except ValueError as e:
        assert "field='" in str(e) or 'field must' in str(e)  # the error names the field
        ours = None
    if text in WALL_CLOCK:
        assert ours is None and _composer(text)[1] == 'sec'
        return
    assert ours == _composer(text)
    assert (ours is not None) == (text in ACCEPTED)
    if ours is not None:
        assert type(ours[0]) is type(_composer(text)[0])  # int for every unit but dur, as Composer


def test_ints_and_composer_time():
    assert parse_duration(7, 'f') == Duration(7, 'ba')
    assert parse_duration(Time(3, 'ep'), 'f') == Duration(3, 'ep')
    assert parse_time('0.25dur', 'f') == Time(0.25, 'dur')
    for bad in (True, 2.5, None, ['1ba']):
        with pytest.raises(ValueError, match='^f must be'):
            parse_duration(bad, 'f')


def test_core_parser_imports_no_framework():
    code = 'import sys, prores_algo.timing as t; t.parse_duration("5ba", "f"); print("composer" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'False'
