"""Several long-lived worker processes pulling trials from one study.

Each worker is a separate process that owns its devices — set through the
environment *before* it imports JAX — and keeps its compiled step between
trials (and shares the persistent compilation cache), so only its first trial
compiles:

* GPUs: ``CUDA_VISIBLE_DEVICES`` lists the worker's ``devices_per_trial`` GPUs,
  and ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` keeps a worker from taking the
  memory of devices it does not use;
* CPU only (like CI): ``XLA_FLAGS=--xla_force_host_platform_device_count=D``
  gives each worker D host devices, so the same sharded code path runs.

Workers stop when the study holds the requested number of finished trials
(up to workers − 1 more may be finishing then). The launcher follows progress
by reading the storage, forwards SIGINT/SIGTERM to the workers (their running
trials are marked FAILED, nothing stays RUNNING) and exits non-zero if any
worker did. A worker that dies without cleaning up (SIGKILL, a native abort)
leaves its trial RUNNING: the launcher fails and re-queues it as soon as it
sees the exit (:mod:`dptune.search.orphans`), and the other workers go on. After a
signal the launcher raises :class:`dptune.interrupt.Interrupted` for that
signal once every worker has stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dptune.progress import Event, JsonLines, Reporter

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.study import Study
    from optuna.trial import FrozenTrial

# Optuna, JAX and the study driver are imported where they are used: a worker
# process must install its signal handling before those slow imports.


def local_gpus() -> list[str]:
    """Indices of the NVIDIA GPUs on this machine (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


SMALL_MODELS = ("cnn",)


def auto_layout(model: str, storage: str) -> tuple[int, int | None, str]:
    """(workers, devices per trial, why) for ``--workers auto``.

    Small models gain nothing from sharding one trial: one worker per GPU. Large
    models use every device for one trial. SQLite allows one writer, so there it
    is always one in-process worker over all local devices. ``why`` is empty
    when there was nothing to choose (at most one GPU).
    """
    from dptune.search.storage import kind

    gpus = local_gpus()
    if len(gpus) <= 1:
        return 1, None, ""
    if model in SMALL_MODELS and kind(storage) != "sqlite":
        return len(gpus), 1, f"small model: one worker per GPU ({len(gpus)} GPUs)"
    if model in SMALL_MODELS:
        return 1, None, "SQLite allows one writer: one trial across all GPUs (use journal:// for one per GPU)"
    return 1, None, f"large model: each trial shards over all {len(gpus)} GPUs"


def worker_env(index: int, devices_per_trial: int, gpus: list[str]) -> dict[str, str]:
    """The environment that gives worker ``index`` its own devices."""
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if gpus:
        mine = gpus[index * devices_per_trial:(index + 1) * devices_per_trial]
        if len(mine) < devices_per_trial:
            from dptune.errors import StudyError

            raise StudyError(f"devices_per_trial: {len(gpus)} GPUs cannot give each of the workers "
                             f"{devices_per_trial}; lower --workers or --devices-per-trial")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    else:
        # JAX_NUM_CPU_DEVICES (set by the CLI for itself) would override the worker's own count.
        env.pop("JAX_NUM_CPU_DEVICES", None)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_trial}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_pool(
    study_name: str,
    storage: str,
    *,
    workers: int,
    n_trials: int | None,
    timeout: float | None,
    devices_per_trial: int = 1,
    cache_dir: str | None = None,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    poll_seconds: float = 1.0,
    progress: Reporter | None = None,
) -> int:
    """Run ``workers`` worker processes until ``n_trials`` more trials finish; returns an exit code.

    With ``progress``, each worker writes its events as JSON lines to its standard output, and they
    reach ``progress`` here tagged with the worker's index.
    """
    from dptune.search import results
    from dptune.search import study as study_lib
    from dptune.search.storage import check_workers, open_storage

    check_workers(storage, workers)
    study, _ = study_lib.load(study_name, storage)
    done_before = len(study.get_trials(deepcopy=False, states=results.FINISHED))
    target = None if n_trials is None else done_before + n_trials
    gpus = local_gpus()
    cmd = _worker_command(study_name, storage, target, timeout, cache_dir, progress_json=progress is not None)
    if progress is not None:
        poll_seconds = min(poll_seconds, 0.25)
    pool = _Pool([worker_env(i, devices_per_trial, gpus) for i in range(workers)], relay=progress is not None)
    previous = {s: signal.signal(s, pool.forward) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    storage_obj = open_storage(storage)
    try:
        pool.start(cmd)
        _watch(pool, study, storage_obj, study_name, on_trial, progress, poll_seconds)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _finish(pool, study, progress)


def _worker_command(study_name: str, storage: str, target: int | None, timeout: float | None,
                    cache_dir: str | None, *, progress_json: bool) -> list[str]:
    """The command line of one worker process (:func:`_worker_main`)."""
    cmd = [sys.executable, "-m", "dptune.search.workers", "--study-name", study_name, "--storage", storage]
    if target is not None:
        cmd += ["--stop-at-finished", str(target)]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    if progress_json:
        cmd += ["--progress-json"]
    return cmd


class _Pool:
    """The worker processes, the signals the launcher received for them, and the threads relaying their events."""

    def __init__(self, envs: list[dict[str, str]], *, relay: bool) -> None:
        self.envs = envs
        self.relay = relay
        self.procs: list[subprocess.Popen] = []
        self.received: list[int] = []
        self.readers: list[threading.Thread] = []
        self.events: queue.Queue[Event] = queue.Queue()

    def forward(self, signum: int, _frame: object) -> None:
        """Signal handler: the signal to every running worker."""
        # The same signal, so that each worker stops as the user asked; its trial is failed, not lost.
        self.received.append(signum)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def start(self, cmd: list[str]) -> None:
        """One process per environment, unless a signal has come meanwhile."""
        for env in self.envs:
            if self.received:
                break
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if self.relay else None,
                                               text=True))
            if self.relay:
                self.readers.append(_relay(self.procs[-1], len(self.procs) - 1, self.events))

    def deliver(self, progress: Reporter | None) -> None:
        """The events relayed so far, to ``progress``."""
        while progress is not None and not self.events.empty():
            progress(self.events.get())


def _watch(pool: _Pool, study: Study, storage_obj: BaseStorage, study_name: str,
           on_trial: Callable[[FrozenTrial], None] | None, progress: Reporter | None, poll_seconds: float) -> None:
    """Until no worker runs: reap the trials of workers that died, relay events, report each finished trial once."""
    from dptune.search import study as study_lib

    seen: set[int] = set()
    reaped: set[int] = set()
    while True:
        running = any(p.poll() is None for p in pool.procs)
        died = {p.pid for p in pool.procs if p.returncode not in (None, 0)} - reaped
        if died:
            # A worker that died natively (SIGKILL, SIGABRT) left its trial RUNNING;
            # fail and re-queue it now instead of when a surviving worker ends its trial.
            study_lib.reap_dead_workers(study)
            reaped |= died
        # The workers' events first: a trial's validations come before the line saying it finished.
        pool.deliver(progress)
        if on_trial is not None:
            for t in storage_obj.get_all_trials(storage_obj.get_study_id_from_name(study_name), deepcopy=False):
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    on_trial(t)
        if not running:
            break
        time.sleep(poll_seconds)


def _finish(pool: _Pool, study: Study, progress: Reporter | None) -> int:
    """The exit code once every worker has exited, after their last events and the reaping of what they left.

    Raises:
      Interrupted: for the first signal the launcher received.
    """
    from dptune.search import study as study_lib

    codes = [p.wait() for p in pool.procs]
    for reader in pool.readers:
        reader.join(timeout=5)  # the last events a worker wrote before it exited
    pool.deliver(progress)
    if any(codes):
        study_lib.reap_dead_workers(study)
    if pool.received:
        from dptune.interrupt import Interrupted

        raise Interrupted(pool.received[0])
    # A worker killed by signal N reports -N; exit like a shell would (128 + N).
    return next((128 - c if c < 0 else c for c in codes if c != 0), 0)


def _relay(proc: subprocess.Popen, worker: int, events: queue.Queue[Event]) -> threading.Thread:
    """Read a worker's JSON event lines into ``events`` (tagged with ``worker``) until it closes its output."""
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue  # not an event (a library printing on its own)
            kind = d.pop("event", None)
            if kind is not None:
                events.put(Event(str(kind), d).tagged(worker=worker))

    thread = threading.Thread(target=read, daemon=True, name=f"dptune-worker-{worker}-events")
    thread.start()
    return thread


def _worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dptune.search.workers", description="one dptune worker process")
    ap.add_argument("--study-name", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--stop-at-finished", type=int)
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--cache-dir")
    ap.add_argument("--progress-json", action="store_true", help="progress events as JSON lines on stdout")
    args = ap.parse_args(argv)
    from dptune import interrupt
    from dptune.errors import DptuneError

    try:
        with interrupt.handled():
            import logging

            import optuna

            from dptune.search import study as study_lib
            from dptune.trainer import compile_stats

            # As the command line: the launcher reports trials, and absl's per-order RDP notes help no one.
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            logging.getLogger("absl").setLevel(logging.ERROR)

            compile_stats.enable_persistent_cache(args.cache_dir)
            study_lib.optimize(args.study_name, args.storage, timeout=args.timeout,
                               stop_at_finished=args.stop_at_finished,
                               progress=JsonLines(sys.stdout) if args.progress_json else None)
    except KeyboardInterrupt as e:
        # The launcher says it once for all workers.
        return interrupt.exit_code(e)
    except DptuneError as e:
        print(f"dptune worker {os.getpid()}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
