"""One background job at a time (training), run as a subprocess in its own process group, logs streamed line by line.

Why a process group: the trainers may spawn workers (accelerate, data loaders); Stop must take all of them down, so
the job is started with `start_new_session=True` and stopped with killpg (SIGTERM, then SIGKILL after a grace
period). A reader thread drains stdout into memory and `log.txt` so the pipe never fills when nobody is watching
(a closed browser tab does not stop a job; Stop or the app's exit does).

Why a death signal: atexit does not run when the app is killed hard, so on Linux the job also asks the kernel for
SIGTERM when its parent goes (prctl PR_SET_PDEATHSIG). The kernel means the parent *thread*, and Gradio runs handlers
on worker threads that retire when idle, so jobs are forked from one long-lived daemon thread.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from multicrafter.errors import UserError

LOG_NAME = "log.txt"
JOB_NAME = "job.json"
PR_SET_PDEATHSIG = 1


@dataclass
class Job:
    argv: list[str]
    run_dir: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    lines: deque = field(default_factory=lambda: deque(maxlen=5000))
    count: int = 0                 # lines read so far (also past the deque's window)
    done: threading.Event = field(default_factory=threading.Event)
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, n: int = 200) -> str:
        return "\n".join(list(self.lines)[-n:])

    def status(self) -> str:
        if not self.done.is_set() or self.proc.poll() is None:
            return f"running (pid {self.pid}, {time.time() - self.started:.0f} s) - {self.run_dir}"
        if self.stopped:
            return f"stopped - {self.run_dir}"
        code = self.proc.returncode
        return f"finished ({'ok' if code == 0 else f'exit code {code}'}) - {self.run_dir}"


def _same_progress_bar(prev: str, line: str) -> bool:
    """Two tqdm renderings of the same bar ('desc:  40%|####  | 2/5 ...')."""
    if "%|" not in prev or "%|" not in line:
        return False
    return prev.split(":", 1)[0] == line.split(":", 1)[0]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc (Linux); [] when none."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that makes the child get SIGTERM when this process dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: the forked child must not load anything
    except (OSError, AttributeError):
        return None
    parent, sig, zero = os.getpid(), ctypes.c_ulong(int(signal.SIGTERM)), ctypes.c_ulong(0)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, zero, zero, zero)
        if os.getppid() != parent:   # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Spawner:
    """Runs every Popen on one long-lived daemon thread (the 'parent' PR_SET_PDEATHSIG watches)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="job-spawner")
                self._thread.start()
        fut: Future = Future()
        self._queue.put((fut, args, kwargs))
        return fut.result()

    def _loop(self) -> None:
        while True:
            fut, args, kwargs = self._queue.get()
            try:
                fut.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                fut.set_exception(exc)


_SPAWNER = _Spawner()


class JobRunner:
    """Start, follow and stop a single subprocess job; `start` refuses a second job while one runs."""

    def __init__(self, grace_s: float = 5.0):
        self.grace_s = grace_s
        self.job: Job | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.proc.poll() is None

    def start(self, argv: Sequence[str], run_dir: str | Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, meta: dict | None = None) -> Job:
        with self._lock:
            if self.running:
                raise UserError(f"a training job is already running ({self.job.run_dir}); stop it first")
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
            proc = _SPAWNER.popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  bufsize=1, start_new_session=True, env=full_env, cwd=cwd, errors="replace",
                                  preexec_fn=die_with_parent())
            job = Job(argv=list(argv), run_dir=run_dir, proc=proc)
            info = dict(meta or {}, argv=list(argv), pid=proc.pid, started=job.started)
            (run_dir / JOB_NAME).write_text(json.dumps(info, indent=2) + "\n")
            threading.Thread(target=self._pump, args=(job,), daemon=True).start()
            self.job = job
            return job

    @staticmethod
    def _pump(job: Job) -> None:
        with open(job.run_dir / LOG_NAME, "a", encoding="utf-8") as log:
            for line in job.proc.stdout:
                line = line.rstrip("\n")
                if job.lines and (_same_progress_bar(job.lines[-1], line) or (job.lines[-1] == "" and "%|" in line)):
                    job.lines[-1] = line        # tqdm redraws (\r, read as new lines): keep the latest state
                else:
                    job.lines.append(line)
                job.count += 1
                log.write(line + "\n")
                log.flush()
        job.proc.wait()
        job.done.set()

    def stop(self) -> bool:
        """Kill the running job's whole process group; True when something was running."""
        job = self.job
        if job is None or (job.proc.poll() is not None and not group_alive(job.pid)):
            return False
        job.stopped = True
        for sig, wait in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(job.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline and (job.proc.poll() is None or group_alive(job.pid)):
                time.sleep(0.05)
            if job.proc.poll() is not None and not group_alive(job.pid):
                break
        job.proc.wait()
        job.done.wait(timeout=5)
        return True

    def follow(self, job: Job | None = None, poll_s: float = 0.25, every_s: float = 1.0) -> Iterator[Job]:
        """Yield the job whenever new lines arrived (at most every `every_s`), and once more when it has ended."""
        job = job or self.job
        if job is None:
            return
        seen, last = -1, 0.0
        while not job.done.is_set():
            now = time.time()
            if job.count != seen and now - last >= every_s:
                seen, last = job.count, now
                yield job
            job.done.wait(timeout=poll_s)
        yield job


def python_module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter, so the job sees the same environment as the app."""
    return [sys.executable, "-m", module, *args]
