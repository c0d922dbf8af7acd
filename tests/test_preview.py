"""Schedule preview CLI: the printed table is alpha_schedules.alpha, and the heat map is a real PNG."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prores_algo import alpha_schedules
from prores_algo.preview import main, plot_alpha_heatmap, sample_layers, sample_steps

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def parse_table(text):
    """-> (1-based layers shown, {step: [α per shown layer]}, {step: mean})."""
    lines = [l for l in text.splitlines() if l.strip()]
    header_at = next(i for i, l in enumerate(lines) if l.split()[0] == 'step')
    cols = lines[header_at].split()[1:]
    assert cols[-1] == 'mean'
    layers = [int(c.split('=')[1]) for c in cols[:-1]]
    rows, means = {}, {}
    for line in lines[header_at + 1 :]:
        parts = line.split()
        try:
            step = float(parts[0])
        except ValueError:
            break
        values = [float(v) for v in parts[1:]]
        rows[step], means[step] = values[:-1], values[-1]
    return layers, rows, means


def _check(text, schedule, L, W, digits):
    layers, rows, means = parse_table(text)
    tol = 0.6 * 10**-digits
    assert rows, text
    for t, values in rows.items():
        assert len(values) == len(layers)
        for l, v in zip(layers, values, strict=True):
            assert v == pytest.approx(alpha_schedules.alpha(schedule, l - 1, L, t, W), abs=tol), (t, l)
        full = alpha_schedules.alphas(schedule, L, t, W)
        assert means[t] == pytest.approx(sum(full) / L, abs=tol)
    return layers, rows


def test_cli_subprocess_matches_schedule_and_writes_png(tmp_path):
    png = tmp_path / 'alpha.png'
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'prores_algo.preview',
            '--layers',
            '24',
            '--t_warmup',
            '24000',
            '--schedule',
            'linear',
            '--duration',
            '30000',
            '--steps',
            '10',
            '--png',
            str(png),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    layers, rows = _check(out.stdout, 'linear', 24, 24000, 4)
    assert layers[0] == 1 and layers[-1] == 24 and len(layers) == 12  # compact for a deep model
    assert sorted(rows) == [3000.0 * k for k in range(11)]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert data[12:16] == b'IHDR'


@pytest.mark.parametrize('schedule', ['linear', 'linear_square', 'reverse', 'stagewise_sqrt_l', 'staggered', 'sqrt'])
def test_main_every_layer_exact(schedule, capsys):
    assert (
        main(
            [
                '--layers',
                '6',
                '--t_warmup',
                '600',
                '--schedule',
                schedule,
                '--duration',
                '700',
                '--steps',
                '7',
                '--all_layers',
                '--digits',
                '7',
            ]
        )
        == 0
    )
    layers, rows = _check(capsys.readouterr().out, schedule, 6, 600, 7)
    assert layers == [1, 2, 3, 4, 5, 6]
    assert 600.0 in rows  # W itself is always a sampled row


def test_default_warmup_is_1000_per_layer(capsys):
    main(['--layers', '4'])
    text = capsys.readouterr().out
    assert 'W=4000' in text
    _, rows = _check(text, 'linear', 4, 4000, 4)
    assert max(rows) == 5000.0


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--layers', '4', '--schedule', 'nope'])
    assert e.value.code == 2
    assert 'unknown schedule' in capsys.readouterr().err


def test_sampling_helpers():
    assert sample_layers(4, 12) == [0, 1, 2, 3]
    picks = sample_layers(96, 8)
    assert picks[0] == 0 and picks[-1] == 95 and len(picks) == 8
    assert sample_steps(100, 4) == [0, 25, 50, 75, 100]
    assert sample_steps(100, 4, t_warmup=60) == [0, 25, 50, 60, 75, 100]


def test_plot_alpha_heatmap_function(tmp_path):
    path = plot_alpha_heatmap('linear', 12, 1200, 1500, tmp_path / 'h.png', resolution=50)
    assert Path(path).read_bytes()[:8] == PNG_MAGIC
