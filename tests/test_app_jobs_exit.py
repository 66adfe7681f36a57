"""A training job does not outlive the app: SIGTERM to the app stops the job's whole process group (atexit runs),
and on Linux a hard-killed app takes the job with it (PR_SET_PDEATHSIG), even when the job was started from a
worker thread that has since ended (as Gradio's are)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.jobs import group_members

REPO = Path(__file__).resolve().parent.parent

# the app side: app.exit_on_sigterm as app.main installs it, a JobRunner started from a short-lived thread
APP = """
import sys, threading, time
sys.path.insert(0, {repo!r})
import app
from demo.jobs import JobRunner

app.exit_on_sigterm()
runner = JobRunner(grace_s=2.0)
job = []
t = threading.Thread(target=lambda: job.append(runner.start([sys.executable, "-c", {child!r}], {run!r})))
t.start(); t.join()
print(job[0].pid, flush=True)
while True:
    time.sleep(0.05)
"""
# the job: keeps a grandchild (sleep) in its process group and reports its pid
CHILD = ("import subprocess, sys, time\n"
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
         "print('grandchild', g.pid, flush=True)\n"
         "time.sleep(600)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_app(tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    run = tmp_path / "run"
    script = APP.format(repo=str(REPO), child=CHILD, run=str(run))
    app = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    job_pid = int(app.stdout.readline())
    deadline = time.time() + 60
    while time.time() < deadline:
        log = (run / "log.txt").read_text() if (run / "log.txt").exists() else ""
        if log.startswith("grandchild "):
            time.sleep(0.3)
            assert _alive(job_pid), "the job died with the thread that started it"
            return app, job_pid, int(log.split()[1])
        time.sleep(0.05)
    app.kill()
    raise AssertionError("the job did not start")


def _wait_gone(check, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process state from /proc")
def test_sigterm_to_the_app_stops_the_whole_job_group(tmp_path):
    app, job_pid, grandchild = _start_app(tmp_path)
    assert _alive(job_pid) and _alive(grandchild) and group_members(job_pid)
    app.send_signal(signal.SIGTERM)
    assert app.wait(timeout=30) == 143
    assert _wait_gone(lambda: not group_members(job_pid))
    assert not _alive(job_pid) and not _alive(grandchild)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_app_takes_its_job_with_it(tmp_path):
    app, job_pid, grandchild = _start_app(tmp_path)
    app.kill()                                         # SIGKILL: no atexit, no signal handler
    app.wait(timeout=30)
    try:
        assert _wait_gone(lambda: not _alive(job_pid))   # the job got SIGTERM from the kernel
    finally:
        for pid in (job_pid, grandchild):              # the grandchild is outside the kernel's reach: clean up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
