"""Persistence: every evaluated candidate is an optuna trial in a storage (SQLite by default).

* The study name is derived from the model, budget, objective, strategy and seed; the model's
  fingerprint (adapter, class, units, steps, a digest of the weights, the calibration set) is a
  study user attribute, and a storage holding a search of another model is refused.
* Trials complete one by one (``tell``), so a search killed at any moment (``kill -9`` too) loses
  at most the evaluation in flight. On start, a process that finds no other live process on the
  storage (an exclusive ``flock`` on ``<db>.lock`` next to a SQLite file) marks trials left
  RUNNING as failed and enqueues their parameters again, so they are re-evaluated first.
* Trials record heartbeats; with a database server (``--storage postgresql://...``), trials of a
  worker that died are failed and re-enqueued by the surviving workers once their heartbeat is
  older than the grace period.
* A candidate whose schedule was already evaluated completes with the stored values, without
  running again.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from diffaccel.errors import StorageMismatchError
from diffaccel.fingerprint import fingerprint
from diffaccel.search.space import Genome, Space

HEARTBEAT_S = 20
GRACE_S = 90


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
            self.storage = optuna.storages.RDBStorage(
                storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                **{callback: lambda study, trial: _requeue(study, trial, self.names)})
            self._check_others(fp, study_name, check_all_studies)
        self.study = optuna.create_study(study_name=study_name, storage=self.storage, sampler=sampler,
                                         directions=["maximize", "minimize"], load_if_exists=True)
        stored = self.study.user_attrs.get("fingerprint")
        if stored is None:
            self.study.set_user_attr("fingerprint", fp)
        elif stored != fp:
            raise StorageMismatchError(self._mismatch(stored, fp))
        self._recover()

    def _mismatch(self, stored: dict, fp: dict) -> str:
        where = self.url or "the storage"
        if {k: v for k, v in stored.items() if k != "calibration"} == {k: v for k, v in fp.items()
                                                                          if k != "calibration"}:
            return (f"{where} holds a search of this model on another calibration set "
                    f"({stored.get('calibration')}); use another --out (or delete it) to search with this one")
        return (f"{where} holds a search of another model: {_describe(stored)}, not {_describe(fp)}; "
                "use another --out (or delete the storage) for this model")

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
        if self.url is not None:
            optuna.storages.fail_stale_trials(self.study)

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
        with _heartbeat(self.storage, trial._trial_id, self.url is not None):
            done = self.genomes().get(genome)
            if done is not None and done.number != trial.number:
                values, attrs = list(done.values), {**done.user_attrs, "duplicate_of": done.number}
            else:
                values, attrs = evaluate(genome)
            attrs.setdefault("source", label(genome))
            for key, value in attrs.items():
                if key not in trial.user_attrs:
                    trial.set_user_attr(key, value)
            self.study.tell(trial, values)
        return self.study._storage.get_trial(trial._trial_id)


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int, enabled: bool):
    if not enabled:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a transient database error must not kill the search
                pass
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
