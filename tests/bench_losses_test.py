"""Tests for `python -m jaxssl.bench losses` (tiny sizes, no timed asserts)."""

import json
import os
import subprocess
import sys

import pytest

from jaxssl.bench import __main__ as bench_main
from jaxssl.bench import losses as bench_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def report():
  cmd = [sys.executable, '-m', 'jaxssl.bench', 'losses', '--json',
         '--views', '256', '--dim', '8', '--block-size', '48',
         '--repeats', '2', '--budget-gib', '4', '--search-start', '128',
         '--search-max-views', '256']
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=True)
  return json.loads(done.stdout)


def test_cases_report_positive_measurements(report):
  assert [(c['impl'], c['views']) for c in report['cases']] == [
      ('dense', 256), ('blockwise', 256)]
  for case in report['cases']:
    assert case['status'] == 'ok', case
    assert len(case['times_s']) == 2 and min(case['times_s']) > 0
    assert case['first_run_s'] > 0 and case['compile_s'] > 0
    assert case['peak_rss_bytes'] >= case['rss_after_init_bytes'] > 0
    assert case['xla_temp_bytes'] >= 0
    assert 0 < case['loss'] < 100  # finite NT-Xent of random embeddings
  dense, blockwise = report['cases']
  assert blockwise['loss'] == pytest.approx(dense['loss'], rel=1e-5)
  assert report['idle']['status'] == 'ok'
  assert report['idle']['peak_rss_bytes'] > 0


def test_budget_search_reports_each_impl(report):
  searches = {s['impl']: s for s in report['budget_search']}
  assert set(searches) == {'dense', 'blockwise'}
  for result in searches.values():
    # 4 GiB holds these tiny cases, so the search stops at its cap.
    assert result['largest_fitting_views'] == 256
    assert result['first_failing_views'] is None
    assert [p['views'] for p in result['probes']] == [128, 256]
    assert all(p['peak_rss_bytes'] > 0 for p in result['probes'])


def test_table_lists_every_case(report):
  table = bench_losses.format_report(report)
  assert table.count('|     256 |') == 2
  assert 'Idle jax process peak RSS' in table
  assert 'largest fitting 256 views' in table


@pytest.mark.parametrize('limit,start,expected_fit,expected_fail', [
    (3000, 1024, 2816, 3072),   # doubling to 4096, bisection down
    (3000, 8192, 2816, 3072),   # start too big: halve first
    (10**9, 1024, 16384, None),  # never fails: stops at the cap
    (1, 8, None, 2),             # nothing fits
])
def test_search_largest_with_fake_probe(limit, start, expected_fit,
                                        expected_fail):
  probed = []

  def probe(views):
    probed.append(views)
    return views <= limit, {'views': views}

  result = bench_losses.search_largest(probe, start=start, max_views=16384,
                                       ratio=1.1)
  assert result['largest_fitting_views'] == expected_fit
  assert result['first_failing_views'] == expected_fail
  assert all(v % 2 == 0 and v <= 16384 for v in probed)
  assert len(set(probed)) == len(probed)


def test_run_case_kills_above_memory_limit():
  case = {'impl': 'idle', 'views': 0, 'dim': 8, 'block_size': 8,
          'temperature': 0.1, 'repeats': 0, 'repeat_budget_s': 1.0,
          'limit_bytes': 2**30}
  record = bench_losses.run_case(case, timeout_s=120, kill_bytes=20 * 2**20)
  assert record['status'] == 'killed'
  assert 'RSS above' in record['reason']


def test_unknown_subcommand_names_known_ones(capsys):
  with pytest.raises(SystemExit):
    bench_main.main(['lossez'])
  err = capsys.readouterr().err
  assert "'lossez'" in err and 'losses' in err
