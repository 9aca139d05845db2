"""Which process of a run was lost, from what the supervisors publish.

When one process of a multi-process run dies, the workers of the others die
with it, nearly at once: inside the step's cross-process collective (gloo),
or with the coordination service that process 0's worker hosts. Heartbeats
cannot tell the lost process from the survivors then, for every worker stops
beating together, and a survivor's crash output names no process. Their
supervisors (`jaxssl.supervisor`) live on, and so does the watchdog hub
(`jaxssl.peer_hub`), which process 0's supervisor serves. So each
supervisor publishes its worker's fate there:

- `fate/<q>`: `'peer'` when q's worker died after losing a peer (a broken
  connection in its crash output, or its watchdog's own line), `'own'` when
  it died of its own (a signal such as the OOM killer's, a crash);
- `done/<q>`: q's supervisor has concluded and needs the hub no more.

A process whose fate is `'own'`, or that publishes nothing while its worker's
heartbeat (`beat/<q>`, `jaxssl.distributed`) stays still, was lost; when
every other process says it lost a peer, the one left is the lost one. When
the hub itself is gone, process 0's supervisor died, so process 0 was lost.
"""

import time
from typing import Mapping

from jaxssl import peer_hub

PEER = 'peer'
OWN = 'own'
# How long a survivor waits for the others' fates (within the 60 s in which
# a survivor must have stopped), and how long process 0's supervisor keeps
# the hub up for them.
WAIT_SECONDS = 20.
LINGER_SECONDS = 25.
_POLL_SECONDS = 0.2
# A worker whose counter did not move for this many beat intervals is dead.
_SILENT_BEATS = 3


class LostPeerJudge:
  """Decides from the hub's entries which processes were lost.

  Pure bookkeeping (no I/O, time passed in), so it is tested without
  processes; `judge_lost` polls the hub for it.
  """

  def __init__(self, process_index: int, process_count: int,
               beat_interval: float, now: float):
    """Starts watching every other process as of `now` (monotonic seconds).

    Args:
      process_index: this process.
      process_count: the number of processes of the run.
      beat_interval: seconds between the workers' heartbeats.
      now: monotonic seconds.
    """
    self.others = [q for q in range(process_count) if q != process_index]
    self.silent_seconds = _SILENT_BEATS * beat_interval
    self._beats: dict[int, str | None] = {q: None for q in self.others}
    self._changed = {q: now for q in self.others}
    self._lost: list[int] = []

  def observe(self, entries: Mapping[str, str], now: float
              ) -> list[int] | None:
    """The lost processes once every other one is accounted for, else None.

    Args:
      entries: the hub's current `{key: value}`.
      now: monotonic seconds.
    """
    fates = {q: entries.get(f'fate/{q}') for q in self.others}
    own = [q for q in self.others if fates[q] == OWN]
    unknown = [q for q in self.others if fates[q] is None]
    for q in unknown:
      beat = entries.get(f'beat/{q}')
      if beat != self._beats[q]:
        self._beats[q], self._changed[q] = beat, now
    silent = [q for q in unknown
              if now - self._changed[q] > self.silent_seconds]
    self._lost = sorted(own + silent)
    if not own and len(unknown) == 1:
      return unknown  # every other process lost a peer: this one
    if len(silent) == len(unknown) and self._lost:
      return self._lost
    return None

  def conclude(self) -> list[int] | None:
    """The lost processes as far as known when the wait ends, or None."""
    return self._lost or None


def judge_lost(client: peer_hub.HubClient, process_index: int,
               process_count: int, beat_interval: float, *,
               wait_seconds: float = WAIT_SECONDS) -> list[int] | None:
  """Publishes that this worker lost a peer; returns the lost processes.

  Args:
    client: a connection to the run's hub.
    process_index: this process.
    process_count: the number of processes of the run.
    beat_interval: seconds between the workers' heartbeats.
    wait_seconds: how long to wait for the others' fates.

  Returns:
    The lost processes in order, or None when they are not known.
  """
  judge = LostPeerJudge(process_index, process_count, beat_interval,
                        time.monotonic())
  deadline = time.monotonic() + wait_seconds
  update = {f'fate/{process_index}': PEER}
  lost = None
  while lost is None and time.monotonic() < deadline:
    try:
      entries = client.exchange(update)
    except ConnectionError:
      # The hub lives in process 0's supervisor: only its death ends it.
      return [0] if process_index != 0 else None
    update = {}
    lost = judge.observe(entries, time.monotonic())
    if lost is None:
      time.sleep(_POLL_SECONDS)
  lost = lost or judge.conclude()
  publish(client, {f'done/{process_index}': '1'})
  return lost


def publish(client: peer_hub.HubClient, updates: dict[str, str]) -> None:
  """Sets `updates` in the hub if it still answers."""
  try:
    client.exchange(updates)
  except ConnectionError:
    pass  # the hub's process died: nobody is left to read them


def linger(client: peer_hub.HubClient, process_index: int,
           process_count: int, lost: list[int] | None, *,
           seconds: float = LINGER_SECONDS) -> None:
  """Keeps the hub's process up until every survivor has concluded.

  Called by the supervisor that serves the hub, after its own conclusion.

  Args:
    client: a connection to the hub.
    process_index: this process.
    process_count: the number of processes of the run.
    lost: the processes not to wait for (None: wait for every other).
    seconds: the most to wait.
  """
  waiting = set(range(process_count)) - {process_index} - set(lost or ())
  deadline = time.monotonic() + seconds
  while waiting and time.monotonic() < deadline:
    try:
      entries = client.exchange({})
    except ConnectionError:
      return
    waiting = {q for q in waiting if f'done/{q}' not in entries}
    time.sleep(_POLL_SECONDS)
