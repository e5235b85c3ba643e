"""Persistence: every evaluated candidate is an optuna trial in a storage (SQLite by default).

* The study name is derived from the model, budget, objective, strategy and seed; the model's
  fingerprint (adapter, class, units, steps, a digest of the weights, the calibration set) is a
  study user attribute, and a storage holding a search of another model is refused.
* Trials complete one by one (``tell``), so a search killed at any moment (``kill -9`` too) loses
  at most the evaluation in flight. On start, a process that finds no other live process on the
  storage (an exclusive ``flock`` on ``<db>.lock`` next to a SQLite file) marks trials left
  RUNNING as failed and enqueues their parameters again, so they are re-evaluated first.
* Trials record heartbeats; with a database server (``--storage postgresql://...``), trials of a
  worker that died are failed and re-enqueued by the surviving workers (or a restarted one) once
  their heartbeat is older than the grace period (``DIFFACCEL_HEARTBEAT_S``, ``DIFFACCEL_GRACE_S``
  seconds: 20 and 90 unless set).
* A candidate whose schedule was already evaluated completes with the stored values, without
  running again; one that another worker is evaluating right now (workers that enqueue the same
  seed plan at once) waits for that trial and takes its values, so no schedule is evaluated twice.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.util
import inspect
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from diffaccel.errors import SearchError, StorageMismatchError
from diffaccel.fingerprint import fingerprint
from diffaccel.search.space import Genome, Space

HEARTBEAT_S = 20
BEATING = "heartbeat"  # user attr: this trial's worker has started beating
WORKER = "worker"  # user attr: host:pid of the process that evaluates the trial
GRACE_S = 90


def heartbeat_settings() -> tuple[int, int]:
    """Heartbeat interval and grace period in seconds (environment overrides, for quick tests or long trials)."""
    beat = int(os.environ.get("DIFFACCEL_HEARTBEAT_S", HEARTBEAT_S))
    return beat, max(int(os.environ.get("DIFFACCEL_GRACE_S", GRACE_S)), beat + 1)


def database_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can load: a bare ``postgresql://`` means psycopg 3
    to SQLAlchemy 2.1, while the ``distributed`` extra installs psycopg2 (``psycopg2-binary``)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    if importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    raise StorageMismatchError(f"--storage {scheme}://... needs a PostgreSQL driver: pip install psycopg2-binary "
                               "(or: pip install 'diffaccel[distributed]')")


def study_key(space: Space, calibration: str) -> dict:
    """What a stored study must match to be continued: the model, its weights, the space, the calibration set."""
    return {"adapter": space.adapter.name, "model_class": type(space.model).__name__, "units": space.units,
            "granularity": space.granularity, "num_steps": space.num_steps,
            "weights": fingerprint(space.model), "calibration": calibration}


def _describe(fp: dict) -> str:
    return (f"{fp.get('model_class')} ({fp.get('adapter')} adapter, {len(fp.get('units', []))} units, "
            f"{fp.get('num_steps')} steps, weights {fp.get('weights')})")


def _requeue(study: optuna.Study, trial: FrozenTrial, names: list[str]) -> None:
    """Enqueue a failed trial's parameters again, if it got all of them (else nothing was run)."""
    if all(name in trial.params for name in names):
        study.enqueue_trial({name: trial.params[name] for name in names},
                            user_attrs={"retry_of": trial.number})


def _retrying(fn: Callable[[], object], attempts: int = 6) -> object:
    """``fn()``, again after a short pause when the database refuses it: workers started together race
    to create optuna's tables (PostgreSQL: a duplicate ``CREATE TYPE``) and the study's attributes."""
    for attempt in range(attempts):
        try:
            return fn()
        except sqlalchemy.exc.DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + 0.1 * (os.getpid() % 5))
    return None


class Store:
    def __init__(self, storage: str | None, study_name: str, space: Space, fp: dict,
                 sampler: optuna.samplers.BaseSampler | None = None, check_all_studies: bool = False):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.space, self.names = space, space.param_names
        self.url = storage
        self._lock_file = None
        if storage is None:
            self.storage = optuna.storages.InMemoryStorage()
        else:
            params = inspect.signature(optuna.storages.RDBStorage).parameters
            callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
                else "failed_trial_callback"  # optuna < 4.9
            self.heartbeat, grace = heartbeat_settings()
            try:
                self.storage = _retrying(lambda: optuna.storages.RDBStorage(
                    database_url(storage), heartbeat_interval=self.heartbeat, grace_period=grace,
                    **{callback: lambda study, trial: _requeue(study, trial, self.names)}))
            except sqlalchemy.exc.SQLAlchemyError as exc:
                raise SearchError(f"cannot open the search storage {storage}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:160]}; give sqlite:///PATH (a file in a folder that "
                                  "exists) or postgresql://user:password@host/db") from None
            self._check_others(fp, study_name, check_all_studies)
        try:
            self.study = _retrying(lambda: optuna.create_study(
                study_name=study_name, storage=self.storage, sampler=sampler, directions=["maximize", "minimize"],
                load_if_exists=True))
            _retrying(lambda: self._claim(fp))
            self._recover()
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
            cause = exc.__cause__ or exc
            raise SearchError(f"cannot write to the search storage {storage}: {str(cause).splitlines()[0][:160]}; "
                              "a search writes its trials there, also when it resumes: give a storage (or --out) "
                              "it can write to") from None

    def _claim(self, fp: dict) -> None:
        """Record the model's fingerprint on a new study, or refuse a study of another model."""
        stored = self.study.user_attrs.get("fingerprint")
        if stored is None:
            self.study.set_user_attr("fingerprint", fp)
        elif stored != fp:
            raise StorageMismatchError(self._mismatch(stored, fp))

    def _mismatch(self, stored: dict, fp: dict) -> str:
        where = self.url or "the storage"
        differ = {k for k in set(stored) | set(fp) if stored.get(k) != fp.get(k)}
        if differ == {"calibration"}:
            return (f"{where} holds a search of this model on another calibration set or quantization (there: "
                    f"{stored.get('calibration')}; this one: {fp.get('calibration')}); use another --out or --storage "
                    "(or delete it) to search with this one")
        if differ <= {"calibration", "num_steps"}:
            return (f"{where} holds a search of this model at {stored.get('num_steps')} denoiser evaluations, not "
                    f"{fp.get('num_steps')}; use another --out or --storage (or delete it) to search at these steps")
        return (f"{where} holds a search of another model: {_describe(stored)}, not {_describe(fp)}; "
                "use another --out or --storage (or delete it) for this model")

    def _check_others(self, fp: dict, study_name: str, check_all: bool) -> None:
        try:
            summaries = optuna.get_all_study_summaries(self.storage)
        except Exception:  # an empty or new database
            return
        for summary in summaries:
            if not check_all and summary.study_name != study_name:
                continue
            stored = summary.user_attrs.get("fingerprint")
            if stored is not None and stored != fp:
                raise StorageMismatchError(self._mismatch(stored, fp))

    # -- recovery ----------------------------------------------------------------------------------
    def _sqlite_path(self) -> Path | None:
        if self.url and self.url.startswith("sqlite:///"):
            path = self.url[len("sqlite:///"):]
            return Path(path) if path and path != ":memory:" else None
        return None

    def _recover(self) -> None:
        """Fail and re-enqueue trials left RUNNING, when no other live process uses the storage."""
        path = self._sqlite_path()
        if path is not None:
            handle = open(str(path) + ".lock", "a+")  # noqa: SIM115 -- held for the life of the store
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except OSError:
                alone = False
            if alone:
                self._fail_running()
            fcntl.flock(handle, fcntl.LOCK_SH)  # tell later processes that this one is alive
            self._lock_file = handle
        elif self.url is None:
            self._fail_running()
        self.fail_stale()

    def _fail_running(self) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                _requeue(self.study, trial, self.names)

    def fail_stale(self) -> None:
        """Fail and re-enqueue the trials of dead workers: those whose heartbeat stopped (optuna), and
        those whose worker died before its first heartbeat (optuna never counts those as stale)."""
        if self.url is None:
            return
        optuna.storages.fail_stale_trials(self.study)
        grace = heartbeat_settings()[1]
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start
            if BEATING in trial.user_attrs or started is None or \
                    (datetime.datetime.now() - started).total_seconds() <= grace:
                continue
            try:
                if self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    _requeue(self.study, trial, self.names)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first (or it finished after all)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if isinstance(self.storage, optuna.storages.RDBStorage):
            self.storage.remove_session()
            self.storage.engine.dispose()

    # -- reading -----------------------------------------------------------------------------------
    def complete(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def n_complete(self) -> int:
        return len(self.complete())

    def has_waiting(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def settle(self, deadline: float | None, poll_s: float = 0.5) -> bool:
        """Once the study holds enough trials: wait while other workers' trials still run, so that one
        whose worker died (its heartbeat stops) is failed and re-enqueued rather than left behind.
        True when a trial waits to be evaluated."""
        while True:
            self.fail_stale()
            if self.has_waiting():
                return True
            if self.url is None or not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                return False
            if deadline is not None and time.time() >= deadline:
                return False
            time.sleep(poll_s)

    def genomes(self, states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> dict[Genome, FrozenTrial]:
        out: dict[Genome, FrozenTrial] = {}
        for trial in self.study.get_trials(deepcopy=False, states=states):
            genome = self.space.from_params(trial.params)
            if genome is not None:
                out.setdefault(genome, trial)
        return out

    # -- one evaluation ---------------------------------------------------------------------------
    def evaluate_next(self, evaluate: Callable[[Genome], tuple[list[float], dict]],
                      label: Callable[[Genome], str]) -> FrozenTrial:
        """Ask for the next trial (a waiting one first), evaluate it (or reuse the stored values of
        the same schedule), and tell the result; returns the completed trial."""
        self.fail_stale()
        trial = self.study.ask(self.space.distributions())
        genome = self.space.from_params(trial.params)
        with _heartbeat(self.storage, trial._trial_id, self.url is not None, getattr(self, "heartbeat", HEARTBEAT_S)):
            if self.url is not None:
                trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")
                trial.set_user_attr(BEATING, True)  # from here on, a stopped heartbeat tells this worker died
            done = self._evaluated_before(genome, trial.number)
            if done is not None:
                values, attrs = list(done.values), {**done.user_attrs, "duplicate_of": done.number}
            else:
                values, attrs = evaluate(genome)
            attrs.setdefault("source", label(genome))
            for key, value in attrs.items():
                if key not in trial.user_attrs:
                    trial.set_user_attr(key, value)
            self.study.tell(trial, values)
        return self.study._storage.get_trial(trial._trial_id)

    def _receiving(self, trial: FrozenTrial) -> bool:
        return not all(name in trial.params for name in self.names)

    def _evaluated_before(self, genome: Genome, number: int, poll_s: float = 0.2) -> FrozenTrial | None:
        """The completed trial of ``genome`` other than ``number``; while an earlier trial of it is still
        running (another worker), wait for it. None when ``genome`` is this trial's to evaluate (also
        when the earlier one failed: its worker died)."""
        while True:
            # the running trials are read before the completed ones: an earlier trial that completes
            # between the two reads is then seen complete, never missed
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            done = self.genomes().get(genome)
            if done is not None and done.number != number:
                return done
            # an earlier trial still receiving its parameters (optuna's ask marks it RUNNING first, then
            # writes them one by one) may be the same schedule: wait until it can be read
            if not any(t.number < number and (self._receiving(t) or self.space.from_params(t.params) == genome)
                       for t in running):
                return None  # only earlier trials are waited for: two workers never wait for each other
            time.sleep(poll_s)
            self.fail_stale()


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int, enabled: bool, interval: float = HEARTBEAT_S):
    if not enabled:
        yield
        return
    stop = threading.Event()
    try:  # the first beat before the work starts, so that a trial is never long without one
        storage.record_heartbeat(trial_id)
    except Exception:
        pass

    def beat():
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a transient database error must not kill the search
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
