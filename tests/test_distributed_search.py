"""Plan search with several workers on one optuna study in a real PostgreSQL server: each worker is
started on its own with the same command (``--storage postgresql://...``); no trial is lost or
evaluated twice, the front is the union of what the workers evaluated, and a worker killed with
``kill -9`` in the middle of a trial has that trial failed and re-evaluated by the others, while a
restarted worker joins again.

The server is a throwaway cluster from the Debian packages (``initdb`` / ``pg_ctl`` in a temporary
folder, on a free localhost port, as the ``postgres`` user when the tests run as root); the tests
skip, saying why, where PostgreSQL or psycopg2 is not installed (``.ci/run`` installs both)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from diffaccel.search.store import BEATING, WORKER, database_url

TESTS = Path(__file__).resolve().parent
STEPS = 6
TRIALS = 14
SETTINGS = dict(budget="psnr>=20", strategy="nsga2", population=4, seed=5)
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_engine import make_pipes
    from diffaccel.search import search
    from diffaccel.zoo.pipeline import shapes_workload
    workload = shapes_workload([0, 1], {steps}, per_class=1)
    def calibrate(pipe):  # the workload, made to last a little: a kill lands in the middle of a trial
        time.sleep(0.3)
        return workload(pipe)
    calibrate.description = workload.description
    log = lambda line: print(line, file=sys.stderr, flush=True)
    search(make_pipes()[0], calibrate, trials={trials}, storage=sys.argv[1], out=sys.argv[2], log=log,
           **{settings!r})
""")


# -- a throwaway PostgreSQL server ----------------------------------------------------------------------
def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_owner(user: str | None, *command: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``command`` as ``user``."""
    return ["runuser", "-u", user, "--", *command] if user else list(command)


def _owner() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root and there is no postgres or nobody user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this module: yields ``(host, port)``; stopped and deleted after."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    del psycopg2
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql): no initdb found")
    user = _owner()
    folder = Path(tempfile.mkdtemp(prefix="diffaccel-pg-"))
    data = folder / "data"
    if user:
        shutil.chown(folder, user)
    port = _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(_as_owner(user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                 "-E", "UTF8", "--no-sync"), **run)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_owner(user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                 str(folder / "server.log"), "-w", "-t", "60", "start"), **run)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
        log = (folder / "server.log").read_text()[-1000:] if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(exc, 'stderr', '') or exc} {log}")
    try:
        yield "127.0.0.1", port
    finally:
        subprocess.run(_as_owner(user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request):
    """A new, empty database on the server for one test: its URL."""
    import psycopg2

    host, port = postgres
    name = "diffaccel_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:40].lower()
    connection = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"postgresql://postgres@{host}:{port}/{name}"


# -- workers ----------------------------------------------------------------------------------------------
class Worker:
    """One search worker: a process running the same command as the others (only --out differs)."""

    def __init__(self, script: Path, url: str, out: Path):
        self.out = out
        self.log = out.with_suffix(".log")
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src"), "DIFFACCEL_HEARTBEAT_S": "1",
               "DIFFACCEL_GRACE_S": "4"}
        self.handle = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, str(script), url, str(out)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.handle)

    def trials(self) -> list[int]:
        """Trial numbers this worker reported as done (its log lines ``trial N: ...``)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [int(line.split()[1].rstrip(":")) for line in lines if line.startswith("trial ")]

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.handle.close()
        return code

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.wait()


def script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(SCRIPT.format(tests=str(TESTS), steps=STEPS, trials=TRIALS, settings=SETTINGS))
    return path


def study(url: str):
    import optuna

    url = database_url(url)  # the driver SQLAlchemy should load (psycopg2)
    names = optuna.get_all_study_names(url)
    assert len(names) == 1, names  # every worker joined the same study
    return optuna.load_study(study_name=names[0], storage=url)


def front_of(out: Path) -> set[tuple]:
    return {(round(p["calib_psnr"], 6), round(p["mac_fraction"], 9))
            for p in json.loads((out / "front.json").read_text())["front"]}


def pareto_of(trials, handmade: dict) -> set[tuple]:
    """The non-dominated (quality up, cost down) points among trials that save work and the hand-made
    plans (scored once per study; those no genome of the space can express are no trial), as front.json
    lists them."""
    scores = [t.user_attrs for t in trials if "error" not in t.user_attrs] + list(handmade.values())
    points = sorted({(s["psnr"], s["mac_fraction"]) for s in scores if s["mac_fraction"] < 1 - 1e-9},
                    key=lambda p: (p[1], -p[0]))
    front, best = [], -float("inf")
    for psnr, cost in points:
        if psnr > best:
            front.append((round(psnr, 6), round(cost, 9)))
            best = psnr
    return set(front)


def check_study(url: str, workers: list[Worker]) -> list:
    """No trial left behind, none lost (every completed one was reported by exactly one worker), no
    schedule evaluated twice (a repeat reuses the stored values: ``duplicate_of``)."""
    trials = study(url).get_trials(deepcopy=False)
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "FAIL"}, states  # nothing RUNNING or WAITING is left behind
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert TRIALS <= len(complete) <= TRIALS + len(workers) - 1  # workers stop once the study holds TRIALS
    reported = [n for w in workers for n in w.trials()]
    assert sorted(reported) == sorted(t.number for t in complete)  # each reported once, none lost
    evaluated = [tuple(sorted(t.params.items())) for t in complete if "duplicate_of" not in t.user_attrs]
    twice = [(t.number, t.state.name, t.user_attrs.get("source"), t.user_attrs.get("retry_of"), t.datetime_start,
              t.datetime_complete) for t in trials if evaluated.count(tuple(sorted(t.params.items()))) > 1]
    assert len(evaluated) == len(set(evaluated)), f"a schedule was evaluated twice: {twice}"
    return complete


# -- the tests --------------------------------------------------------------------------------------------
def test_two_workers_share_one_study(pg_url, tmp_path):
    path = script(tmp_path)
    workers = [Worker(path, pg_url, tmp_path / f"w{i}") for i in range(2)]
    codes = [w.wait() for w in workers]
    assert codes == [0, 0], [w.log.read_text()[-2000:] for w in workers]
    assert all(w.trials() for w in workers), "both workers must have evaluated trials"
    complete = check_study(pg_url, workers)
    again = Worker(path, pg_url, tmp_path / "again")  # the same command once more: the study is done
    assert again.wait() == 0 and again.trials() == []
    assert front_of(tmp_path / "again") == pareto_of(complete, study(pg_url).user_attrs["handmade"])


def test_a_killed_worker_is_replaced_and_its_trial_re_evaluated(pg_url, tmp_path):
    import optuna

    path = script(tmp_path)
    steady = Worker(path, pg_url, tmp_path / "steady")
    victim = Worker(path, pg_url, tmp_path / "victim")
    deadline = time.time() + 240
    running = []
    while time.time() < deadline and victim.proc.poll() is None:
        # paused (SIGSTOP), the victim cannot finish its trial between our look at the study and the kill
        if len(victim.trials()) >= 2:
            os.kill(victim.proc.pid, signal.SIGSTOP)
            running = [t.number for t in study(pg_url).get_trials(deepcopy=False,
                                                                  states=(optuna.trial.TrialState.RUNNING,))
                       if t.user_attrs.get(WORKER, "").endswith(f":{victim.proc.pid}") and BEATING in t.user_attrs]
            if running:  # in the middle of a trial it has started evaluating
                break
            os.kill(victim.proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    assert victim.proc.poll() is None and running, victim.log.read_text()[-2000:]
    victim.kill()  # kill -9 in the middle of a trial
    assert steady.proc.poll() is None, "the other worker must still be running"
    restarted = Worker(path, pg_url, tmp_path / "restarted")  # the same command again
    assert steady.wait() == 0, steady.log.read_text()[-2000:]
    assert restarted.wait() == 0, restarted.log.read_text()[-2000:]
    trials = study(pg_url).get_trials(deepcopy=False)
    failed = [t for t in trials if t.state.name == "FAIL"]
    summary = " ".join(f"{t.number}:{t.state.name[:4]}:retry_of={t.user_attrs.get('retry_of')}" for t in trials)
    # the victim's trial, failed once its heartbeat stopped
    assert len(failed) == 1 and [failed[0].number] == running, (running, summary)
    retries = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == failed[0].params
    check_study(pg_url, [steady, victim, restarted])
