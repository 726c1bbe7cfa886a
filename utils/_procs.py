"""The process half of ``utils.launch``: what runs inside a rank, and the supervisor.

Private to ``utils.launch`` (chapter 0, "Why one device is not enough"); read that
module's docstring for the user-facing contract. This file holds the two halves
that meet over pipes:

- ``rank_main`` runs in each child: it becomes the leader of a session (and so of
  a process group) of its own, ties its life to its parent, rendezvouses through
  the job's ``FileStore`` with gloo bound to loopback, calls the worker and sends
  back either the result or the formatted traceback; as it ends it kills every
  process it started.
- ``supervise`` runs in the caller: it waits on the children's result pipes,
  their exit sentinels and their output, decides when the job is over and, if it
  failed, which rank is to blame and why.
"""

from __future__ import annotations

import codecs
import ctypes
import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait

import psutil

DEVICE_ENV = "PARLAUNCH_DEVICE"
"""Set in each rank to the device the launcher chose for it ("cuda:0", "cpu"), read
by ``utils.launch.rank_device``."""

GRACE_S = 1.0
"""After the first failure, how long to keep listening so every rank can report.

Peers of a failed rank usually fail a moment later with a connection error; hearing
from them (or from the exit sentinel of a killed rank) lets us blame the right rank.
"""

POLL_S = 0.1
"""Longest single wait, so that a KeyboardInterrupt is serviced promptly."""

WATCH_S = 0.5
"""After closing the job pipe, how long ``stop`` lets the ranks' watcher threads
kill what each rank started and exit, before it terminates them. A watcher needs
the GIL: a rank whose main thread holds it in a long C call uses all of it."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

# Substrings of errors a rank raises because a *peer* failed or never arrived,
# not because of its own code: gloo/store timeouts and closed connections, e.g.
# "Timed out waiting 3000ms for recv operation to complete" or "Connection closed
# by peer". Only RuntimeError (torch.distributed's errors derive from it),
# TimeoutError and ConnectionError count, so a user's ValueError("bad timeout")
# is still blamed on its rank.
_TIMEOUT_MARKS = ("timed out", "timeout", "deadline exceeded")
_PEER_MARKS = ("connection closed", "connection reset", "broken pipe")
_PEER_TYPES = (RuntimeError, TimeoutError, ConnectionError)


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where there is no such call (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _own_session() -> None:
    """Lead a session (so a process group) of our own and adopt our orphans.

    ``setsid(2)``: whatever this rank starts (a ``subprocess``, ``DataLoader``
    workers) is in the group whose id is our pid, which the caller kills after the
    job (``stop``), whether we are still alive or not. ``PR_SET_CHILD_SUBREAPER``
    (prctl(2)): a descendant whose parent dies (a daemon's double fork) is
    reparented to us instead of to init, so ``_end_descendants`` still finds it;
    the setting is not inherited by our children. Neither is needed for the
    rank's own cleanup, so a failure (not Linux) is ignored.
    """
    try:
        os.setsid()
    except OSError:  # already a group leader: cannot happen for a forked child
        pass
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _end_descendants() -> None:
    """SIGKILL every process this rank started, and theirs (never raises).

    Runs as the rank ends (returned, raised, or told to stop by the job pipe). It
    catches what the caller's ``killpg`` cannot: a descendant that left our
    process group (``setsid``, ``start_new_session=True``), which as our subreaper
    child is still our descendant. Zombies (reparented orphans that exited) are
    skipped: init reaps them once we exit. Three rounds, for a process that forked
    while we looked.
    """
    try:
        me = psutil.Process()
        for _ in range(3):
            left = []
            for p in me.children(recursive=True):
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        p.kill()
                        left.append(p)
                except psutil.Error:
                    pass
            if not left:
                return
    except Exception:  # noqa: BLE001 - best effort; the caller's killpg follows
        pass


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the fork server) dies.

    The fork server exits when the caller dies (it watches an "alive" pipe whose
    write end only the caller should hold), and this kills the ranks in turn. But
    multiprocessing hands every child a copy of that write end too, which would keep
    the fork server, and so the ranks, alive forever: close our copy first.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        # Forget the server too: a rank that needs one starts its own.
        server._forkserver_alive_fd = server._forkserver_address = None
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        return  # not Linux: the supervisor still cleans up
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _exit_with_job(job) -> None:
    """Exit as soon as the caller closes the job pipe (or dies, which closes it).

    Covers what PR_SET_PDEATHSIG cannot: the caller ending the job while the fork
    server lives on, even for a rank whose start was interrupted half-way (the
    caller never learnt its pid, so could not kill it).
    """

    def watch():
        try:
            job.recv_bytes()
        except (EOFError, OSError):
            pass
        _end_descendants()
        os._exit(1)

    threading.Thread(target=watch, name="launch-job-watch", daemon=True).start()


def use_device(device) -> None:
    """Make the CUDA ``device`` this process's current one and initialise CUDA now.

    Once CUDA is initialised, torch keeps the choice: ``init_device_mesh`` calls
    ``set_device(LOCAL_RANK)`` only while CUDA is not initialised
    (torch/distributed/device_mesh.py, ``_setup_world_group_and_device``), and
    LOCAL_RANK names a GPU that does not exist when ranks share fewer GPUs.
    """
    import torch

    torch.cuda.set_device(device)
    torch.cuda.init()


def rank_main(
    fn, args, rank, world_size, backend, rendezvous, timeout, pipes, env, device="cpu"
):
    """Entry point of one rank (runs in a process forked by the fork server).

    ``env``: variables to set before init, taken from the caller's environment at
    launch time (the fork server's environment is that of the first launch):
    ``GLOO_SOCKET_IFNAME``, the user's or the loopback interface (see utils.launch).
    ``device``: where this rank computes ("cuda:1", "cpu"; ``Placement.device_for``),
    made current before init and exported as ``PARLAUNCH_DEVICE``. Under gloo the
    rank's CPU threads are its share of the cores, whatever the device: gloo and
    its staging of CUDA tensors through host memory run on them.
    """
    _own_session()
    conn, out, err, job = pipes
    _die_with_parent()
    _exit_with_job(job)
    for stream, pipe, fd in ((sys.stdout, out, 1), (sys.stderr, err, 2)):
        stream.flush()
        os.dup2(pipe.fileno(), fd)  # the caller forwards it (a notebook sees it)
        stream.reconfigure(line_buffering=True)  # progress lines show up promptly
    out.close()
    err.close()
    # A native crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) prints the Python
    # stack of every thread of the rank to its stderr before it dies, which the
    # caller shows: where it died, not only that it did.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        **{DEVICE_ENV: device},
        **env,
    )
    try:
        import torch
        import torch.distributed as dist

        if device.startswith("cuda"):
            use_device(torch.device(device))
        if backend != "nccl":
            # Ranks share the cores: without this each would start one thread per
            # core and they would fight (oversubscription makes gloo labs crawl).
            torch.set_num_threads(max(1, _cpu_count() // world_size))
        # The job's own folder (see utils.launch): a FileStore, not a TCPStore.
        store = dist.FileStore(os.path.join(rendezvous, "store"), world_size)
        store.set_timeout(timedelta(seconds=timeout))
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(*args)
        if dist.is_initialized():  # fn may have torn it down itself
            dist.destroy_process_group()
        # Before reporting: once the caller has heard from every rank it may stop
        # us at once, and a descendant in a session of its own would survive.
        _end_descendants()
        # Plain pickle, not multiprocessing's: that one shares a tensor's storage
        # through a file descriptor that dies with this process.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        reply = ("raised", traceback.format_exc(), _is_peer_error(exc))
        _end_descendants()
        try:
            conn.send_bytes(pickle.dumps(reply))
        except Exception:  # the pipe is gone: the caller is stopping us anyway
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip atexit/destructors that may block on a broken group
    finally:
        conn.close()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / container cpusets
    except AttributeError:
        return os.cpu_count() or 1


def _is_peer_error(exc: BaseException) -> str | None:
    """ "timeout" / "peer" if exc looks like a symptom of another rank's failure."""
    if not isinstance(exc, _PEER_TYPES):
        return None
    text = str(exc).lower()
    if isinstance(exc, TimeoutError) or any(m in text for m in _TIMEOUT_MARKS):
        return "timeout"
    if isinstance(exc, ConnectionError) or any(m in text for m in _PEER_MARKS):
        return "peer"
    return None


@dataclass
class Outcome:
    """What the supervisor learned about each rank."""

    results: dict = field(default_factory=dict)  # rank -> return value
    raised: dict = field(default_factory=dict)  # rank -> (traceback, peer kind|None)
    died: dict = field(default_factory=dict)  # rank -> exit code (no report)
    order: list = field(default_factory=list)  # ranks in the order they failed
    pending: set = field(default_factory=set)  # ranks never heard from
    reason: str = ""  # why the supervisor stopped waiting


@dataclass
class Output:
    """One of the ranks' output pipes (stdout or stderr) and where it goes.

    The bytes are decoded by one incremental UTF-8 decoder per pipe, so that a
    character cut in two by a read's 64 KiB border is joined, not replaced by
    U+FFFD (``codecs.getincrementaldecoder``); an incomplete character left at
    the end shows as U+FFFD (``errors="replace"``).
    """

    conn: object  # the read end, a multiprocessing Connection
    stream: object  # sys.stdout / sys.stderr of the caller
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def forward(self) -> bool:
        """Copy what the ranks printed to our stream; False at EOF."""
        data = os.read(self.conn.fileno(), 65536)
        self._write(self.decoder.decode(data, final=not data))
        return bool(data)

    def flush(self) -> None:
        """Write what the decoder holds back (the job is over)."""
        self._write(self.decoder.decode(b"", final=True))

    def _write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()


def supervise(procs, conns, outputs, timeout: float) -> Outcome:
    """Wait for every rank to report; bound the wait once one finished or failed.

    ``outputs`` is [Output] for the ranks' stdout/stderr pipes.
    Returns as soon as all ranks reported, or ``GRACE_S`` after the first failure,
    or ``timeout`` seconds after the first rank returned, whichever comes first.
    The caller stops whatever is still running.
    """
    o = Outcome(pending=set(range(len(procs))))
    by_obj = {}
    for r, (p, c) in enumerate(zip(procs, conns, strict=True)):
        by_obj[c] = ("conn", r)
        by_obj[p.sentinel] = ("exit", r)
    for output in outputs:
        by_obj[output.conn] = ("out", output)
    deadline = None
    while o.pending:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        left = POLL_S if deadline is None else min(POLL_S, deadline - now)
        for obj in wait(list(by_obj), timeout=left):
            what, key = by_obj[obj]
            if what == "out":
                if not key.forward():
                    del by_obj[obj]
                continue
            r = key
            if r not in o.pending:
                by_obj.pop(obj, None)
                continue
            msg = None
            if what == "conn" or conns[r].poll():
                try:
                    msg = pickle.loads(conns[r].recv_bytes())
                except (EOFError, OSError):
                    msg = None
                except Exception:  # the result pickled there but not here
                    why = f"the caller could not unpickle rank {r}'s result:\n"
                    msg = ("raised", why + traceback.format_exc(), None)
            if msg is None and what == "conn":
                del by_obj[obj]  # EOF: the sentinel will tell us how it died
                continue
            if msg is None:
                procs[r].join(1.0)
                o.died[r] = procs[r].exitcode
                o.order.append(r)
            elif msg[0] == "ok":
                o.results[r] = msg[1]
            else:
                o.raised[r] = (msg[1], msg[2])
                o.order.append(r)
            o.pending.discard(r)
            now = time.monotonic()
            if r in o.results:  # stragglers get `timeout` seconds from here
                if deadline is None:
                    deadline, o.reason = now + timeout, "finished"
            elif o.reason != "failed":  # first failure: hear the others briefly
                end = now + GRACE_S
                deadline = end if deadline is None else min(deadline, end)
                o.reason = "failed"
    return o


def drain(outputs) -> None:
    """Forward whatever the (now stopped) ranks printed last."""
    for output in outputs:
        while output.conn.poll(0):
            try:
                if not output.forward():
                    break
            except OSError:
                break
        output.flush()


def stop(procs, job, grace: float = 0.0) -> list[int]:
    """End the job; returns the ranks that had to be stopped.

    Waits up to ``grace`` seconds for ranks to exit on their own (after a success
    they are only tearing down), closes the job pipe and waits up to ``WATCH_S``
    (each rank's watcher kills what the rank started, then exits), then
    terminates and finally kills whatever is left. Last, whatever happened, it
    SIGKILLs each rank's process group (``kill_groups``), so that nothing a rank
    started outlives the job.
    """
    end = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    job.close()
    end = time.monotonic() + (WATCH_S if alive else 0.0)
    for r in alive:
        procs[r].join(max(0.0, end - time.monotonic()))
    for r in alive:
        if procs[r].is_alive():
            procs[r].terminate()
    end = time.monotonic() + 1.0
    for r in alive:
        procs[r].join(max(0.0, end - time.monotonic()))
    for r in alive:
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join(5.0)
    kill_groups(procs)
    return alive


def kill_groups(procs) -> None:
    """SIGKILL the process group each rank leads (``_own_session``).

    The group's id is the rank's pid. A rank that had not yet called ``setsid``
    leads no group, and ``killpg`` then fails with ESRCH: it never reaches the
    caller's own group. Linux does not reuse a pid while a process group of that
    id has members, so a live group of that id is the rank's, except if the group
    emptied and the pid came round again (all pids used in between) since.
    """
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def signal_name(exitcode: int | None) -> str:
    """ "SIGKILL" for -9, "exit code 3" for 3."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT", "SIGILL")
"""The signals Python's ``faulthandler`` reports (each rank enables it)."""


def blame(o: Outcome, stopped, timeout: float, backend: str):
    """(message, rank, kind, ranks) for a failed job: name the rank at fault.

    A rank that raised on its own, or died, is at fault. A rank that failed only
    waiting for a peer (a collective timeout or a closed connection; under NCCL, a
    SIGABRT from its watchdog, which aborts the process on a timeout) is a witness:
    the ranks never heard from are then named as hung, with its error as context.
    """

    def witness(r: int) -> bool:
        if r in o.died:
            return backend == "nccl" and o.died[r] == -signal.SIGABRT
        return bool(o.raised[r][1])

    def text(r: int) -> str:
        if r in o.died:
            return f"rank {r} was aborted (SIGABRT) by NCCL's watchdog; see stderr"
        return o.raised[r][0]

    own = [r for r in o.order if not witness(r)]
    running = [r for r in stopped if r in o.pending]  # never reported, stopped
    note = f"\n(ranks still running, stopped: {running})" if running else ""
    if own and own[0] in o.died:
        r, how = own[0], signal_name(o.died[own[0]])
        if how.startswith("SIG"):
            msg = f"rank {r} was killed by {how} without returning a result"
            if how in CRASH_SIGNALS:
                msg += " (its threads' Python stacks are in its stderr above)"
        else:
            msg = (
                f"rank {r} died with {how} without returning a result (it may have "
                "failed before reaching the worker: see its stderr above; a script "
                'that calls launch at top level needs an `if __name__ == "__main__":`'
                " guard)"
            )
        return msg + note, r, "killed", own
    if own:
        r = own[0]
        return f"rank {r} raised; its traceback:\n\n{text(r)}{note}", r, "raised", own
    hung = sorted(o.pending)
    names = ", ".join(map(str, hung or sorted(o.order)))
    if hung and o.order:
        w, them = o.order[0], "them" if len(hung) > 1 else "it"
        msg = (
            f"rank {names} hung: rank {w} failed waiting for {them} in a collective "
            f"(timeout {timeout:g} s). Rank {w}'s error, for context:\n\n{text(w)}"
        )
    elif hung:
        msg = (
            f"rank {names} hung: still running {timeout:g} s after the first rank "
            f"returned (timeout={timeout:g})"
        )
    else:  # waiters whose peers returned or failed the same way: blame the waiters
        msg = (
            f"rank {names} failed waiting for other ranks (timeout {timeout:g} s), "
            "which had returned or failed the same way: do all ranks call the same "
            f"collectives in the same order? Rank {o.order[0]}'s error:\n\n"
            f"{text(o.order[0])}"
        )
    culprits = hung or sorted(o.order)
    return msg + note, culprits[0], "hung", culprits
