"""The watchdog's key-value hub (jaxssl.peer_hub), on loopback."""

import json
import socket
import struct
import time

import pytest

from jaxssl import peer_hub


@pytest.fixture
def hub():
  server = peer_hub.HubServer('127.0.0.1')
  yield server
  server.close()


def _client(server, token=None, hosts=('127.0.0.1',)):
  return peer_hub.HubClient(list(hosts), server.port,
                            token or server.token, timeout_seconds=5)


def test_clients_see_each_others_entries(hub):
  first, second = _client(hub), _client(hub)
  assert first.exchange({'beat/0': '1'}) == {'beat/0': '1'}
  assert second.exchange({'beat/1': '4'}) == {'beat/0': '1', 'beat/1': '4'}
  assert first.exchange({'beat/0': '2'}) == {'beat/0': '2', 'beat/1': '4'}
  assert second.exchange({}) == {'beat/0': '2', 'beat/1': '4'}


def test_a_wrong_token_changes_nothing(hub):
  with pytest.raises(ConnectionError, match='wrong token'):
    _client(hub, token='0' * 32).exchange({'exit/0': 'left'})
  assert _client(hub).exchange({}) == {}


@pytest.mark.parametrize('line', [b'not json', b'{"set": {}}', b'[1, 2]'])
def test_malformed_requests_are_refused(hub, line):
  assert json.loads(hub.answer(line)) == {'error': 'malformed request'}


def test_a_closed_hub_raises_connection_error_then_reconnects_fails(hub):
  client = _client(hub)
  client.exchange({'beat/1': '1'})
  hub.close()
  for _ in range(2):  # the broken connection, then the refused reconnect
    with pytest.raises(ConnectionError):
      client.exchange({'beat/1': '2'})


def test_a_peer_that_resets_its_connection_prints_nothing(hub, capsys):
  # A killed peer's kernel resets its connection mid-request; process 0's
  # hub must not print a traceback for it (the watchdog says one line).
  client = _client(hub)
  client.exchange({'beat/1': '1'})
  dying = socket.create_connection(('127.0.0.1', hub.port))
  dying.sendall(b'{"token": ')  # half a request, then a reset (RST)
  time.sleep(0.2)
  dying.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                   struct.pack('ii', 1, 0))
  dying.close()
  time.sleep(0.5)  # the hub's thread reads the reset
  assert client.exchange({'beat/1': '2'}) == {'beat/1': '2'}
  assert capsys.readouterr().err == ''


def test_the_client_tries_each_host_and_keeps_the_good_one(hub):
  client = _client(hub, hosts=('host.invalid', '127.0.0.1'))
  assert client.exchange({'a': 'b'}) == {'a': 'b'}
  assert client.hosts[0] == '127.0.0.1'
  assert client.address == f'127.0.0.1:{hub.port}'


@pytest.mark.parametrize('host, expected', [
    ('127.0.0.1', True), ('127.0.1.1', True), ('localhost', True),
    ('::1', True), ('[::1]', True), ('10.0.0.1', False), ('node-0', False)])
def test_is_loopback(host, expected):
  assert peer_hub.is_loopback(host) is expected


def test_advertised_hosts_prefer_the_coordinator_host():
  assert peer_hub.advertised_hosts('10.0.0.1') == ['10.0.0.1']
  hosts = peer_hub.advertised_hosts(None)
  assert hosts and not any(peer_hub.is_loopback(h) for h in hosts[2:])


def test_share_hub_in_one_process_connects_to_itself():
  server, client = peer_hub.share_hub('127.0.0.1', timeout_seconds=5)
  try:
    assert client.hosts == ['127.0.0.1'] and client.port == server.port
    assert client.exchange({'beat/0': '0'}) == {'beat/0': '0'}
  finally:
    client.close()
    server.close()
