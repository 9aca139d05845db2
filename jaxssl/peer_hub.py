"""A small TCP key-value hub that the processes of a run share for heartbeats.

The multi-process watchdog (`jaxssl.distributed`) needs a store that every
process can write its own keys to (heartbeat counter, exit state) and read
all keys from. JAX's coordination service has one, but no public accessor
for its client, so jaxssl runs its own: process 0 serves the store on its
host (one thread per connection; in its supervisor, `jaxssl.supervisor`,
when there is one, so that the store outlives a crashed worker), and its
address and a random token reach the other processes through
`multihost_utils.broadcast_one_to_all`, a collective that every process
makes right after `jax.distributed.initialize`.

Protocol: one JSON object per line. A request `{"token": t, "set": {key:
value, ...}}` stores the pairs and is answered with the whole store,
`{"entries": {key: value, ...}}`; a request with a wrong token is answered
`{"error": "..."}` and changes nothing.
"""

import ipaddress
import json
import secrets
import socket
import socketserver
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

# Bytes of the broadcast that carries the hub's address (JSON, zero-padded).
_ADDRESS_BYTES = 1024


def is_loopback(host: str) -> bool:
  """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


class HubServer:
  """The store, served on `(bind_host, any free port)` by daemon threads."""

  def __init__(self, bind_host: str):
    """Starts serving at once.

    Args:
      bind_host: the interface to listen on: a loopback address for a
        single-machine run, `''` (every IPv4 interface) or `'::'` otherwise.
    """
    self.token = secrets.token_hex(16)
    self._entries: dict[str, str] = {}
    self._lock = threading.Lock()
    self._connections: set[socket.socket] = set()
    hub = self

    class Handler(socketserver.StreamRequestHandler):

      def handle(self):
        hub.track(self.connection)
        try:
          for line in self.rfile:
            self.wfile.write(hub.answer(line) + b'\n')
            self.wfile.flush()
        except OSError:
          # A peer that dies mid-request resets its connection: that is
          # the watchdog's news to tell (one line), not a traceback here.
          pass

    class Server(socketserver.ThreadingTCPServer):
      address_family = (socket.AF_INET6 if ':' in bind_host
                        else socket.AF_INET)
      daemon_threads = True
      allow_reuse_address = True

    self._server = Server((bind_host.strip('[]'), 0), Handler)
    self.port = self._server.server_address[1]
    threading.Thread(target=self._server.serve_forever, name='jaxssl-hub',
                     daemon=True).start()

  def track(self, connection: socket.socket) -> None:
    """Remembers a client's connection, for `close` to drop."""
    with self._lock:
      self._connections.add(connection)

  def answer(self, line: bytes) -> bytes:
    """The reply (one JSON line, without the newline) to one request line."""
    try:
      request = json.loads(line)
      updates = request['set']
      token = request['token']
    except (ValueError, KeyError, TypeError):
      return json.dumps({'error': 'malformed request'}).encode()
    if not secrets.compare_digest(str(token), self.token):
      return json.dumps({'error': 'wrong token'}).encode()
    with self._lock:
      self._entries.update({str(k): str(v) for k, v in updates.items()})
      return json.dumps({'entries': self._entries}).encode()

  def close(self) -> None:
    """Stops serving and drops every connection, as if the process died."""
    if self._server is None:
      return
    self._server.shutdown()
    self._server.server_close()
    self._server = None
    with self._lock:
      for connection in self._connections:
        try:
          connection.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass  # already closed by its client
      self._connections.clear()


class HubClient:
  """One process's connection to the hub; safe to use from several threads."""

  def __init__(self, hosts: list[str], port: int, token: str,
               timeout_seconds: float):
    """Connects lazily, on the first `exchange`.

    Args:
      hosts: names or addresses of process 0's host, tried in order.
      port: the hub's port.
      token: the hub's token.
      timeout_seconds: how long one connect or one answer may take.
    """
    self.hosts, self.port, self.token = list(hosts), port, token
    self._timeout = timeout_seconds
    self._lock = threading.Lock()
    self._socket: socket.socket | None = None
    self._reader = None

  @property
  def address(self) -> str:
    return f'{self.hosts[0]}:{self.port}'

  def exchange(self, updates: dict[str, str]) -> dict[str, str]:
    """Stores `updates` and returns the whole store.

    Raises:
      OSError: the hub did not answer (its process died, or the network);
        the next call reconnects.
    """
    request = json.dumps({'token': self.token, 'set': updates}).encode()
    with self._lock:
      try:
        if self._socket is None:
          self._connect()
        self._socket.sendall(request + b'\n')
        line = self._reader.readline()
        if not line:
          raise ConnectionError('the hub closed the connection')
        reply = json.loads(line)
      except (OSError, ValueError) as e:
        self.close()
        raise ConnectionError(str(e) or type(e).__name__) from e
    if 'error' in reply:
      raise ConnectionError(f"the hub refused: {reply['error']}")
    return reply['entries']

  def _connect(self) -> None:
    error: OSError | None = None
    for i, host in enumerate(self.hosts):
      try:
        self._socket = socket.create_connection((host.strip('[]'), self.port),
                                                timeout=self._timeout)
      except OSError as e:
        error = e
        continue
      self.hosts.insert(0, self.hosts.pop(i))  # try the good one first
      self._reader = self._socket.makefile('rb')
      return
    raise error or ConnectionError('no host to connect to')

  def close(self) -> None:
    if self._socket is not None:
      self._socket.close()
    self._socket = self._reader = None


def advertised_hosts(coordinator_host: str | None) -> list[str]:
  """Names under which the other processes may reach process 0's host.

  Args:
    coordinator_host: the host of an explicit --coordinator_address (it is
      process 0's host by definition), or None when a cluster environment
      configured jax.distributed.
  """
  if coordinator_host:
    return [coordinator_host]
  name = socket.gethostname()
  hosts = [socket.getfqdn(name), name]
  try:
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
  except OSError:
    infos = []
  hosts += [info[4][0] for info in infos if not is_loopback(info[4][0])]
  return list(dict.fromkeys(hosts))


def share_hub(coordinator_host: str | None, timeout_seconds: float, *,
              serve: Callable[[str], tuple[int, str] | None] | None = None
              ) -> tuple[HubServer | None, HubClient]:
  """Starts the hub for process 0 and connects every process to it.

  A collective: every process calls it once, right after
  `jax.distributed.initialize`.

  Args:
    coordinator_host: see `advertised_hosts`.
    timeout_seconds: passed to `HubClient`.
    serve: on process 0, asks another process on this host to serve the
      hub on the given bind address and returns its `(port, token)`, or None
      when there is no such process (`jaxssl.supervisor.serve_hub`: the
      supervisor outlives a crashed worker, and so does the hub).

  Returns:
    `(server, client)`; `server` is None except on process 0 when this
    process serves the hub itself.
  """
  server = None
  payload = np.zeros(_ADDRESS_BYTES, np.uint8)
  if jax.process_index() == 0:
    hosts = advertised_hosts(coordinator_host)
    bind = hosts[0] if is_loopback(hosts[0]) else (
        '::' if ':' in hosts[0] else '')
    served = serve(bind) if serve is not None else None
    if served is None:
      server = HubServer(bind)
      served = server.port, server.token
    text = json.dumps([hosts, *served]).encode()
    if len(text) > _ADDRESS_BYTES:
      raise ValueError(f'host names too long to share: {hosts}')
    payload[:len(text)] = np.frombuffer(text, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(payload))
  hosts, port, token = json.loads(shared.astype(np.uint8).tobytes()
                                  .rstrip(b'\0'))
  return server, HubClient(hosts, port, token, timeout_seconds)
