"""Preemption: SIGTERM or SIGINT ends a run at a step boundary, checkpointed.

Cloud TPU maintenance events, spot VMs, Kubernetes and SLURM all announce a
stop with SIGTERM and a grace period (about 30 s on Cloud TPU); Ctrl-C sends
SIGINT. While the training loop runs, `StopRequests` turns either signal into
a flag. The loop asks `should_stop()` after every step; when it says yes, the
trainer saves a full checkpoint of that step, waits until it is committed,
and raises `Preempted`, which the command line turns into one line on stderr
and exit status `EXIT_PREEMPTED`. Rerunning the same command resumes from
that step exactly (the state is the whole pytree, the data order and the
per-step keys are functions of the step).

In a multi-process run the signal may reach some processes only, or reach
them at different steps. Every process therefore takes part, after every
step, in one tiny cross-process reduction of its flag (the max of one int32
per device, jitted on the training mesh), so all of them stop after the
same step and save the same checkpoint. The reduction is dispatched like a
step and read one step later, when it is long done: the host never waits
for the device because of it, so the training loop stays asynchronous
(reading it at once would block the host until the step finished, every
step). The stop therefore comes one step after the step during which the
flags were read; the decision depends only on which flags were set before
that reduction, never on timing inside it.

A second signal while the run is already stopping is not caught: SIGTERM
then ends the process at once (the default action) and SIGINT raises
KeyboardInterrupt, for a user who cannot wait for the save.
"""

import functools
import signal
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# EX_TEMPFAIL of BSD's sysexits.h: "temporary failure, the user is invited
# to retry". Schedulers that restart on failure restart on it too.
EXIT_PREEMPTED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint of `step`."""

  def __init__(self, signal_name: str, step: int, directory: str):
    self.signal_name = signal_name
    self.step = step
    super().__init__(
        f'stopped by {signal_name} after step {step}; its checkpoint is '
        f'saved in {directory}; rerun the same command to resume from step '
        f'{step}')


class StopRequests:
  """A context that catches SIGTERM and SIGINT as a stop request.

  Use around the training loop, in the main thread (Python delivers
  signals there only; elsewhere the context catches nothing):

    with StopRequests() as stop:
      for step in ...:
        state = train_step(state, batch)
        if stop.should_stop():
          save(step); raise Preempted(...)

  The previous handlers are restored on exit.
  """

  def __init__(self, mesh: Mesh | None = None):
    """`mesh`: the training mesh, on which multi-process runs reduce the
    flags (required when `jax.process_count() > 1`)."""
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._mesh = mesh
    self._pending: jax.Array | None = None

  def __enter__(self) -> 'StopRequests':
    if threading.current_thread() is threading.main_thread():
      for signum in _SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      return
    # Asked twice: stop now, as if the handler had never been installed.
    signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM
                  else signal.default_int_handler)
    signal.raise_signal(signum)

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal (no collective)."""
    return self.signal_name is not None

  def should_stop(self) -> bool:
    """Whether any process of the run was asked to stop.

    A single process reads its own flag. In a multi-process run this is a
    collective (every process must call it once per step): it dispatches
    the reduction of this step's flags and answers from the previous
    call's reduction, so every process gives the same answer at the same
    step, one step after the flags were read, without blocking.
    """
    if jax.process_count() == 1:
      return self.requested
    previous, self._pending = self._pending, _any_flag(
        self._mesh, int(self.requested))
    if previous is None:
      return False
    return bool(np.asarray(previous.addressable_data(0)))

  def reason(self) -> str:
    """The signal's name, or the peer's part in it (for the message)."""
    return self.signal_name or 'a signal sent to another process'


@functools.lru_cache(maxsize=None)
def _max_over_devices(mesh: Mesh):
  return jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))


def _any_flag(mesh: Mesh, flag: int) -> jax.Array:
  """The max of every process's `flag`, a replicated scalar (not waited for).

  Each process puts its flag on each of its devices of `mesh` (a 1-D mesh
  over every device of the run) and the jitted max reduces over all of
  them, a cross-process all-reduce.
  """
  local = np.full((len(mesh.local_devices),), flag, np.int32)
  flags = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P(mesh.axis_names)), local, (mesh.devices.size,))
  return _max_over_devices(mesh)(flags)
