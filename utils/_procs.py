"""The process half of ``utils.launch``: what runs inside a rank, and the supervisor.

Private to ``utils.launch`` (chapter 0, "Why one device is not enough"); read that
module's docstring for the user-facing contract. This file holds the two halves
that meet over pipes:

- ``rank_main`` runs in each child: it ties its life to its parent, rendezvouses
  through the job's ``FileStore``, calls the worker and sends back either the
  result or the formatted traceback.
- ``supervise`` runs in the caller: it waits on the children's result pipes,
  their exit sentinels and their output, decides when the job is over and, if it
  failed, which rank is to blame and why.
"""

from __future__ import annotations

import ctypes
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

GRACE_S = 1.0
"""After the first failure, how long to keep listening so every rank can report.

Peers of a failed rank usually fail a moment later with a connection error; hearing
from them (or from the exit sentinel of a killed rank) lets us blame the right rank.
"""

POLL_S = 0.1
"""Longest single wait, so that a KeyboardInterrupt is serviced promptly."""

_PR_SET_PDEATHSIG = 1

# Substrings of errors a rank raises because a *peer* failed or never arrived,
# not because of its own code: gloo/store timeouts and closed connections, e.g.
# "Timed out waiting 3000ms for recv operation to complete" or "Connection closed
# by peer". Only RuntimeError (torch.distributed's errors derive from it),
# TimeoutError and ConnectionError count, so a user's ValueError("bad timeout")
# is still blamed on its rank.
_TIMEOUT_MARKS = ("timed out", "timeout", "deadline exceeded")
_PEER_MARKS = ("connection closed", "connection reset", "broken pipe")
_PEER_TYPES = (RuntimeError, TimeoutError, ConnectionError)


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
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor still cleans up
        return
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
        os._exit(1)

    threading.Thread(target=watch, name="launch-job-watch", daemon=True).start()


def rank_main(fn, args, rank, world_size, backend, rendezvous, timeout, pipes):
    """Entry point of one rank (runs in a process forked by the fork server)."""
    conn, out, err, job = pipes
    _die_with_parent()
    _exit_with_job(job)
    for stream, pipe, fd in ((sys.stdout, out, 1), (sys.stderr, err, 2)):
        stream.flush()
        os.dup2(pipe.fileno(), fd)  # the caller forwards it (a notebook sees it)
        stream.reconfigure(line_buffering=True)  # progress lines show up promptly
    out.close()
    err.close()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
    )
    try:
        import torch
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
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
        # Plain pickle, not multiprocessing's: that one shares a tensor's storage
        # through a file descriptor that dies with this process.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        try:
            reply = ("raised", traceback.format_exc(), _is_peer_error(exc))
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


def _forward(fd: int, stream) -> bool:
    """Copy what a rank printed to our stream; False at EOF."""
    data = os.read(fd, 65536)
    if not data:
        return False
    stream.write(data.decode("utf-8", errors="replace"))
    stream.flush()
    return True


def supervise(procs, conns, outputs, timeout: float) -> Outcome:
    """Wait for every rank to report; bound the wait once one finished or failed.

    ``outputs`` is [(read_conn, stream)] for the ranks' stdout/stderr pipes.
    Returns as soon as all ranks reported, or ``GRACE_S`` after the first failure,
    or ``timeout`` seconds after the first rank returned, whichever comes first.
    The caller stops whatever is still running.
    """
    o = Outcome(pending=set(range(len(procs))))
    by_obj = {}
    for r, (p, c) in enumerate(zip(procs, conns, strict=True)):
        by_obj[c] = ("conn", r)
        by_obj[p.sentinel] = ("exit", r)
    for rc, stream in outputs:
        by_obj[rc] = ("out", stream)
    deadline = None
    while o.pending:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        left = POLL_S if deadline is None else min(POLL_S, deadline - now)
        for obj in wait(list(by_obj), timeout=left):
            what, key = by_obj[obj]
            if what == "out":
                if not _forward(obj.fileno(), key):
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
    for rc, stream in outputs:
        while rc.poll(0):
            try:
                if not _forward(rc.fileno(), stream):
                    break
            except OSError:
                break


def stop(procs, job, grace: float = 0.0) -> list[int]:
    """End the job; returns the ranks that had to be stopped.

    Waits up to ``grace`` seconds for ranks to exit on their own (after a success
    they are only tearing down), closes the job pipe (each rank's watcher exits),
    then terminates and finally kills whatever is left.
    """
    end = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    job.close()
    for r in alive:
        procs[r].terminate()
    end = time.monotonic() + 1.0
    for r in alive:
        procs[r].join(max(0.0, end - time.monotonic()))
    for r in alive:
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join(5.0)
    return alive


def signal_name(exitcode: int | None) -> str:
    """ "SIGKILL" for -9, "exit code 3" for 3."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


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
