"""Naming the lost process from the supervisors' fates, as bookkeeping and
through a real hub. The supervisors themselves are in supervisor_test.py."""

import threading
import time

import pytest

from jaxssl import peer_fates
from jaxssl import peer_hub

PEER, OWN = peer_fates.PEER, peer_fates.OWN


def _judge(index=0, count=3, interval=1., now=0.):
  return peer_fates.LostPeerJudge(index, count, interval, now)


def test_the_one_process_that_says_nothing_while_all_others_lost_a_peer():
  judge = _judge(index=0, count=4)
  entries = {'fate/1': PEER, 'fate/3': PEER}
  assert judge.observe(entries, now=0.1) == [2]


def test_with_two_processes_the_other_one_at_once():
  assert _judge(index=1, count=2).observe({}, now=0.) == [0]


def test_a_process_that_died_of_its_own_is_named_once_the_rest_is_known():
  judge = _judge(index=0, count=3)
  entries = {'fate/1': OWN, 'beat/2': '7'}
  assert judge.observe(entries, now=0.5) is None  # is 2 alive? not yet known
  entries['fate/2'] = PEER
  assert judge.observe(entries, now=1.) == [1]


def test_silent_processes_are_lost_and_beating_ones_are_not():
  judge = _judge(index=0, count=4, interval=1.)
  entries = {'beat/1': '5', 'beat/2': '9', 'beat/3': '2'}
  for now in (0., 1., 2., 3.):
    entries['beat/2'] = str(10 + int(now))  # 2 beats on; 1 and 3 are still
    assert judge.observe(entries, now) is None
  assert judge.observe(entries, now=3.5) is None  # 2 is alive, undecided
  assert judge.conclude() == [1, 3]


def test_all_still_and_silent_long_enough_are_named_together():
  judge = _judge(index=2, count=4, interval=1.)
  entries = {'fate/0': PEER, 'beat/1': '4', 'beat/3': '4'}
  assert judge.observe(entries, now=0.) is None
  assert judge.observe(entries, now=2.9) is None
  assert judge.observe(entries, now=3.1) == [1, 3]


def test_nothing_is_named_when_every_other_process_is_alive():
  judge = _judge(index=0, count=3, interval=1.)
  for now in range(6):
    assert judge.observe({'beat/1': str(now), 'beat/2': str(now)},
                         float(now)) is None
  assert judge.conclude() is None


@pytest.fixture
def hub():
  server = peer_hub.HubServer('127.0.0.1')
  yield server
  server.close()


def _client(server):
  return peer_hub.HubClient(['127.0.0.1'], server.port, server.token,
                            timeout_seconds=2.)


def test_two_survivors_of_three_agree_through_the_hub(hub):
  # Processes 0 and 2 lost their peer; 1 was killed and publishes nothing.
  results = {}

  def survivor(index):
    results[index] = peer_fates.judge_lost(_client(hub), index, 3, 0.2,
                                           wait_seconds=10.)

  threads = [threading.Thread(target=survivor, args=(q,)) for q in (0, 2)]
  started = time.monotonic()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == {0: [1], 2: [1]}
  assert time.monotonic() - started < 5  # not the whole wait
  entries = _client(hub).exchange({})
  assert {k: v for k, v in entries.items() if k.startswith('fate/')} == {
      'fate/0': PEER, 'fate/2': PEER}
  assert 'done/0' in entries and 'done/2' in entries


def test_a_hub_that_is_gone_means_process_0_is_gone(hub):
  client = _client(hub)
  client.exchange({})
  hub.close()
  assert peer_fates.judge_lost(client, 2, 3, 0.2, wait_seconds=5.) == [0]


def test_the_hubs_process_lingers_until_the_survivors_are_done(hub):
  client = _client(hub)
  threading.Timer(0.5, lambda: _client(hub).exchange({'done/2': '1'})).start()
  started = time.monotonic()
  peer_fates.linger(client, 0, 3, lost=[1], seconds=10.)
  assert 0.4 < time.monotonic() - started < 5
