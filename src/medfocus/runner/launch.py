"""Run a command's shards on several local devices or as a Slurm job array, through submitit.

The paper's grid (6 models x 3 datasets x 2 modes x 11 methods over ~1,900 samples per mode) is days
of GPU time. The commands already split work into stable shards (``--shard i/n``, see
:func:`medfocus.runner.grid.shard_of`) whose outputs are resumable and idempotent; this module only
*schedules* those shard commands, on an existing engine rather than a home-made one:
`submitit <https://github.com/facebookincubator/submitit>`_ (MIT), the field's standard Python front
end to Slurm job arrays, which also runs the same job function locally.

Launchers:

``local``
    one worker process per listed device (``--devices cuda:0,cuda:1`` or ``cpu,cpu``) through
    :class:`submitit.LocalExecutor`. A GPU worker is pinned by submitit's own mechanism (the worker
    sees only that GPU through ``CUDA_VISIBLE_DEVICES`` and runs on ``cuda:0``); a CPU worker sees
    no GPU. The shard tasks are dealt round-robin to the workers, each worker runs its tasks one
    after another with its own model copy. While the parent waits, a worker that dies without a
    result (killed, out of memory) is started again up to ``max_restarts`` times; it resumes from its
    store, so nothing is lost or duplicated. A worker that raises (a configuration error, say) is
    not restarted: the error is reported.
``slurm``
    a :class:`submitit.SlurmExecutor` job array, one array task per (model, shard); logs under
    ``<out>/slurm/``. A preempted or timed-out task is requeued by submitit (``checkpoint`` below)
    and resumes from its store.

Each task runs the ``medfocus`` command itself (``attribute ... --shard i/n`` or ``bench build ...
--shard i/n``) in the worker, with the same options as the parent, so a launched run computes exactly
what the single-process command computes: per-key seeds do not depend on the shard
(:func:`medfocus.runner.grid.item_seed`). The parent writes ``<out>/launch/manifest.json`` (the tasks,
their outputs and the expected record counts); :func:`shard_status` reads it for ``medfocus status``
and :func:`merge_outputs` combines the shard outputs into the normal outputs (``medfocus merge``),
which the parent does itself when every task has finished.

Where each task writes:

* ``attribute``: ``<out>/predictions.shard-<i>-of-<n>.jsonl`` (one model) or
  ``<out>/predictions.<model>.shard-<i>-of-<n>.jsonl`` when several models are launched (one task per
  model and shard), merged into ``<out>/predictions.jsonl``.
* ``bench build``: a complete bench output folder ``<out>/shards/<i>-of-<n>/`` per shard, the edit and
  generation caches shared in ``--cache-dir`` (default ``<out>/edits``); merged into
  ``<out>/<model>/<dataset>/<mode>.json`` + ``.log.jsonl`` and the retention table.

submitit is an optional dependency: ``pip install 'medfocus[slurm]'``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from medfocus.errors import ConfigError, DataError

LAUNCHERS = ("none", "local", "slurm")
LAUNCH_DIR = "launch"
MANIFEST_NAME = "manifest.json"
#: Seconds between two looks at the workers while the parent waits.
POLL_SECONDS = 2.0


def require_submitit() -> Any:
    """Import submitit or raise a :class:`ConfigError` naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("the local and slurm launchers need submitit: pip install 'medfocus[slurm]'") from None
    return submitit


# ---------------------------------------------------------------------------------------------------
# tasks and the manifest


@dataclass
class ShardTask:
    """One unit of launched work: a ``medfocus`` command line for one shard (of one model).

    Attributes:
        shard: shard number ``i`` in ``[0, n)``.
        n: number of shards.
        model: the model this task covers (``None``: every model of the command).
        argv: the ``medfocus`` arguments the task runs (without ``--device``, added per worker).
        output: the task's output, relative to the run folder (a store file or a shard folder).
        expected: records the task will have written when complete (attribute: samples x methods;
            bench: samples x modes).
    """

    shard: int
    n: int
    model: str | None
    argv: list[str]
    output: str
    expected: int


@dataclass
class Manifest:
    """What was launched into a run folder (``<out>/launch/manifest.json``)."""

    command: str  # "attribute" or "bench build"
    launcher: str
    out: str
    tasks: list[ShardTask]
    devices: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    merged_into: list[str] = field(default_factory=list)
    #: the run was started with ``--overwrite``: its shard records (split-log rows) replace records of
    #: changed samples in the merged file (:func:`medfocus.runner.store.merge_stores`,
    #: :func:`medfocus.bench.build.merge_split_logs`).
    overwrite: bool = False

    def save(self) -> Path:
        from medfocus.io.atomic import atomic_write_text

        path = Path(self.out) / LAUNCH_DIR / MANIFEST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> "Manifest":
        path = Path(out) / LAUNCH_DIR / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"{path} does not exist: {out} was not started with --launcher local|slurm "
                            "(shards run by hand are merged with `medfocus merge` too)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            tasks = [ShardTask(**t) for t in data.pop("tasks")]
            return cls(tasks=tasks, **data)
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{path}: not a medfocus launch manifest ({exc})") from None


def attribute_store_name(shard: int, n: int, model: str | None = None) -> str:
    """File name of an attribute shard's store (``model`` set when tasks are split per model)."""
    from medfocus.bench.build import slug

    tag = f".{slug(model)}" if model else ""
    return f"predictions{tag}.shard-{shard}-of-{n}.jsonl"


def bench_shard_dir(shard: int, n: int) -> str:
    """Folder (relative to the run folder) of one ``bench build`` shard."""
    return f"shards/{shard}-of-{n}"


#: ``predictions[.<model>].shard-<i>-of-<n>.jsonl`` (:func:`attribute_store_name`) and ``<i>-of-<n>``
#: (:func:`bench_shard_dir`): the shard spec is in the name.
_SHARD_NAME = re.compile(r"^(?:predictions(?:\.(?P<model>.+))?\.shard-)?(?P<i>\d+)-of-(?P<n>\d+)(?:\.jsonl)?$")


def shard_spec(path: str | os.PathLike[str]) -> tuple[str | None, int, int] | None:
    """``(model tag or None, i, n)`` of an attribute shard store or a bench shard folder, from its name;
    ``None`` for a name that is not a shard's."""
    m = _SHARD_NAME.match(Path(path).name)
    if m is None or (Path(path).suffix == ".jsonl") != Path(path).name.startswith("predictions"):
        return None
    return m.group("model"), int(m.group("i")), int(m.group("n"))


def check_one_sharding(paths: Sequence[Path], out: Path) -> list[str]:
    """Refuse shard outputs of different shardings (``--shard i/2`` files next to ``--shard i/3`` ones);
    return a note per incomplete sharding (which shards are missing) -- a partial merge is allowed and
    later merges add the rest, but it is not the whole run.

    Raises:
        DataError: more than one shard count ``n`` among ``paths``, naming each file and its spec. The
            shards of two shardings split the samples differently, so together they are neither run.
    """
    found = [(p, *spec) for p in paths if (spec := shard_spec(p)) is not None]
    by_n: dict[int, list[tuple[Path, str | None, int, int]]] = {}
    for entry in found:
        by_n.setdefault(entry[3], []).append(entry)
    if len(by_n) > 1:
        listing = "; ".join(f"{n}-way: " + ", ".join(f"{p.relative_to(out)} ({i}/{n}" + (f", model {m}" if m else "") + ")"
                                                     for p, m, i, _ in sorted(group)) for n, group in sorted(by_n.items()))
        raise DataError(f"{out} holds the shard outputs of {len(by_n)} different shardings ({listing}); their shards split "
                        "the samples differently, so together they are neither run: move away (or delete) the files of "
                        "the sharding you do not want, then merge again")
    notes = []
    for n, group in by_n.items():
        for model in sorted({m for _, m, _, _ in group}, key=str):
            have = {i for _, m, i, _ in group if m == model}
            missing = [i for i in range(n) if i not in have]
            if missing:
                notes.append(f"{len(have)} of {n} shards" + (f" of model {model}" if model else "")
                             + f" present (missing {', '.join(f'{i}/{n}' for i in missing)}): the merged output is not "
                             "the whole run yet; merging again after the missing shards ran adds their records")
    return notes


def manual_shard_outputs(out: Path) -> tuple[list[Path], list[Path]]:
    """The shard outputs of a folder without a launch manifest (shards run by hand with ``--shard i/n``):
    ``(attribute shard stores, bench shard folders)``."""
    stores = sorted(out.glob("predictions*.shard-*.jsonl"))
    dirs = sorted(p for p in (out / "shards").glob("*") if p.is_dir())
    return stores, dirs


# ---------------------------------------------------------------------------------------------------
# devices and executor parameters


def parse_devices(spec: str | Sequence[str] | None) -> list[str]:
    """``"cuda:0,cuda:1"`` / ``"cpu,cpu"`` -> a list of torch device strings (one worker each).

    Raises:
        ConfigError: empty list, or a ``cuda`` device without an index (a worker must be pinned).
    """
    if spec is None:
        raise ConfigError("--launcher local needs --devices, e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu")
    items = [d.strip() for d in (spec.split(",") if isinstance(spec, str) else spec) if d and d.strip()]
    if not items:
        raise ConfigError("--devices is empty; e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu")
    for d in items:
        if d == "cpu":
            continue
        m = re.fullmatch(r"cuda:(\d+)", d)
        if m is None:
            raise ConfigError(f"--devices: {d!r} is not 'cpu' or 'cuda:<index>' (each worker is pinned to one device)")
    return items


def local_worker_parameters(device: str) -> tuple[dict[str, Any], str]:
    """submitit LocalExecutor parameters that pin a worker to ``device``, and the device the
    command then uses inside the worker (``cuda:k`` becomes ``cuda:0`` of a one-GPU view)."""
    if device == "cpu":
        return {"gpus_per_node": 0, "visible_gpus": ()}, "cpu"
    k = int(device.split(":")[1])
    return {"gpus_per_node": 1, "visible_gpus": (k,)}, "cuda:0"


def parse_slurm_time(value: str | int | None) -> int:
    """``--slurm-time`` as minutes: an int, ``"MM"``, ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``."""
    if value is None:
        return 24 * 60
    if isinstance(value, int):
        minutes = value
    else:
        s = str(value).strip()
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
        if m is None:
            raise ConfigError(f"--slurm-time {value!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
        d, a, b, c = m.groups()
        if b is None:
            minutes = int(a) + 24 * 60 * int(d or 0)
        else:
            parts = [int(a), int(b)] + ([int(c)] if c is not None else [])
            if len(parts) == 3:
                h, mi, sec = parts
            else:
                h, mi, sec = parts[0], parts[1], 0
            minutes = 24 * 60 * int(d or 0) + 60 * h + mi + (1 if sec else 0)
    if minutes < 1:
        raise ConfigError(f"--slurm-time {value!r}: must be at least one minute")
    return minutes


def slurm_parameters(*, partition: str | None = None, gpus_per_task: int | None = None, time: str | int | None = None,
                     array_parallelism: int | None = None, account: str | None = None,
                     extra: Sequence[str] = (), job_name: str = "medfocus") -> dict[str, Any]:
    """The :class:`submitit.SlurmExecutor` parameters (sbatch options) of a launch.

    ``extra`` are ``KEY=VALUE`` strings (``--slurm-param``) passed to sbatch as ``--KEY=VALUE``
    (submitit's ``additional_parameters``). Raises :class:`ConfigError` on malformed values.
    """
    params: dict[str, Any] = {"job_name": job_name, "time": parse_slurm_time(time), "signal_delay_s": 120}
    if partition:
        params["partition"] = partition
    if gpus_per_task is not None:
        if gpus_per_task < 0:
            raise ConfigError(f"--slurm-gpus-per-task must be >= 0, got {gpus_per_task}")
        params["gpus_per_task"] = gpus_per_task
    if array_parallelism is not None:
        if array_parallelism < 1:
            raise ConfigError(f"--slurm-array-parallelism must be >= 1, got {array_parallelism}")
        params["array_parallelism"] = array_parallelism
    if account:
        params["account"] = account
    additional: dict[str, str] = {}
    for spec in extra:
        key, eq, value = str(spec).partition("=")
        key = key.strip().lstrip("-")
        if not eq or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ConfigError(f"--slurm-param {spec!r}: expected KEY=VALUE, e.g. --slurm-param mem=64G")
        additional[key.replace("-", "_")] = value.strip()
    if additional:
        params["additional_parameters"] = additional
    return params


# ---------------------------------------------------------------------------------------------------
# the job function


class ShardJob:
    """The submitit job function: runs ``medfocus`` command lines one after another in the worker.

    Picklable and stateless; the outputs carry the state. :meth:`checkpoint` is submitit's hook on
    preemption or timeout: it resubmits the same command lines, which resume from their stores.
    """

    def __call__(self, argvs: Sequence[Sequence[str]]) -> int:
        from medfocus.cli import main

        for argv in argvs:
            main.main(args=list(argv), prog_name="medfocus", standalone_mode=False)
        return len(argvs)

    def checkpoint(self, argvs: Sequence[Sequence[str]]) -> Any:
        submitit = require_submitit()
        return submitit.helpers.DelayedSubmission(self, argvs)


def with_device(argv: Sequence[str], device: str | None) -> list[str]:
    return list(argv) + (["--device", device] if device else [])


# ---------------------------------------------------------------------------------------------------
# progress, status and merge


def _count_done(path: Path) -> tuple[int, int, list[str]]:
    """(records, records with an error, the models they are of) of a store file or a bench shard folder
    (last record per key)."""
    from medfocus.bench.build import read_log
    from medfocus.runner.store import read_jsonl, record_key

    if path.is_dir():  # bench shard: every split log under it
        rows = [r for log in sorted(path.glob("*/*/*.log.jsonl")) for r in read_log(log).values()]
    elif path.exists():
        rows = list({record_key(r): r for r in read_jsonl(path)[0]}.values())  # last record per key
    else:
        rows = []
    return len(rows), sum(1 for r in rows if r.get("error")), sorted({str(r["model"]) for r in rows if r.get("model")})


#: ``shard_status``'s model of a task whose name carries none and that has written no record yet.
NO_RECORDS_YET = "(no records yet)"


def shard_status(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-task progress of a run: ``shard``, ``model``, ``output``, ``done``, ``expected``, ``errors`` (read
    from the outputs, so it is right even after the parent exited).

    A launched run's tasks come from its manifest. Shards run by hand (no manifest) are the shard files
    and folders found in ``out`` (:func:`manual_shard_outputs`), with ``expected`` ``None``: how many
    records a hand-run shard will write is known only to the command that ran it.

    Raises:
        DataError: no launch manifest and no shard output in ``out``.
    """
    out = Path(out)
    # a damaged manifest is an error (Manifest.load names it); only an absent one means shards run by hand
    man = Manifest.load(out) if (out / LAUNCH_DIR / MANIFEST_NAME).exists() else None
    if man is None:
        stores, dirs = manual_shard_outputs(out)
        found = [(p, shard_spec(p)) for p in stores + dirs]
        if not found:
            raise DataError(f"{out} has no launch manifest ({LAUNCH_DIR}/{MANIFEST_NAME}: not started with --launcher "
                            "local|slurm) and no shard outputs (predictions*.shard-*.jsonl files or shards/ folders) "
                            "of shards run by hand")
        tasks = [(spec[1] if spec else "?", spec[2] if spec else "?", spec[0] if spec else None, p, None)
                 for p, spec in found]
    else:
        tasks = [(t.shard, t.n, t.model, out / t.output, t.expected) for t in man.tasks]
    rows = []
    for i, n, model, path, expected in tasks:
        done, errors, models = _count_done(path)
        # a task without a model tag (hand-run shards, a launch over every model) shows the models of
        # its records, and says so while it has none
        rows.append({"shard": f"{i}/{n}", "model": model or ", ".join(models) or NO_RECORDS_YET, "output": str(path.relative_to(out)), "done": done,
                     "expected": expected, "errors": errors})
    return rows


def _merge_bench(out: Path, shard_dirs: Sequence[Path], *, overwrite: bool = False) -> list[str]:
    from medfocus.bench.build import merge_split_logs

    return merge_split_logs(shard_dirs, out, overwrite=overwrite)


def merge_outputs(out: str | os.PathLike[str], *, overwrite: bool | None = None,
                  notes: list[str] | None = None) -> list[str]:
    """Combine the shard outputs of a run folder into its normal outputs; returns what was written.

    With a launch manifest the tasks' outputs are merged; without one (shards run by hand with
    ``--shard i/n``), every ``predictions*.shard-*.jsonl`` file and every ``shards/*`` bench folder in
    ``out`` is. Merging is idempotent: rerunning it after more shards finished adds their records.
    Raises :class:`DataError` when there is nothing to merge or the outputs come from different
    shardings (:func:`check_one_sharding`), :class:`ConfigError` when a shard record
    (or bench split-log row) and the merged file's of one key were computed on different samples, unless ``overwrite``
    (default: the manifest's, i.e. whether the launched run had ``--overwrite``; else ``False``).
    ``notes`` (when given) receives a line per incomplete sharding (the shards still missing).
    """
    from medfocus.runner.store import describe_merge, merge_stores

    out = Path(out)
    man = Manifest.load(out) if (out / LAUNCH_DIR / MANIFEST_NAME).exists() else None  # a damaged one is named
    if man is not None:
        outputs = [out / t.output for t in man.tasks]
        stores = [p for p in outputs if p.suffix == ".jsonl" and p.exists()]
        dirs = [p for p in outputs if p.is_dir()]
        # a launched run is one sharding; its tasks say which outputs are still to come
        pending = [f"{t.output} (shard {t.shard}/{t.n})" for t in man.tasks if not (out / t.output).exists()]
        found = [f"{len(pending)} of {len(man.tasks)} launched tasks have no output yet: {', '.join(pending)}"] if pending else []
    else:
        stores, dirs = manual_shard_outputs(out)
        # shards run by hand: refused when mixed, checked before anything is written
        found = check_one_sharding(stores, out) + check_one_sharding(dirs, out)
    if notes is not None:
        notes += found
    written: list[str] = []
    if overwrite is None:
        overwrite = bool(man is not None and man.overwrite)
    if stores:
        n = merge_stores(stores, out / "predictions.jsonl", overwrite=overwrite)
        written.append(describe_merge(out / "predictions.jsonl", n, len(stores)))
    if dirs:
        written += _merge_bench(out, dirs, overwrite=overwrite)
    if not written:
        raise DataError(f"nothing to merge in {out}: no predictions*.shard-*.jsonl files and no shards/ folders")
    return written


# ---------------------------------------------------------------------------------------------------
# launching


def _job_outcome(job: Any) -> tuple[str, str]:
    """``("ok" | "died" | "raised", message)`` of a finished submitit job.

    submitit reports a job that raised as :class:`~submitit.core.utils.FailedJobError` (with the
    worker's traceback) and one that left no result at all -- killed, out of memory -- as
    :class:`~submitit.core.utils.UncompletedJobError`; the local controller calls both "FINISHED"."""
    from submitit.core.utils import UncompletedJobError

    exc = job.exception()
    if exc is None:
        return "ok", ""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if isinstance(exc, UncompletedJobError):
        return "died", lines[0] if lines else "no result"
    # the last line of a worker traceback is the error itself (e.g. "click...: --param ...")
    return "raised", lines[-1] if lines else type(exc).__name__


def launch(
    manifest: Manifest,
    *,
    devices: Sequence[str] = (),
    device: str | None = None,
    slurm: dict[str, Any] | None = None,
    wait: bool = True,
    progress: bool = True,
    max_restarts: int = 2,
    echo: Callable[[str], None] = print,
) -> Manifest:
    """Start the tasks of ``manifest`` with its launcher; wait, restart dead local workers and merge.

    Args:
        manifest: the tasks (see :class:`ShardTask`); ``manifest.launcher`` is ``local`` or ``slurm``.
        devices: the local workers' devices (``local``).
        device: the ``--device`` the Slurm tasks pass to the command (default: the command's own).
        slurm: :func:`slurm_parameters` (``slurm``).
        wait: wait for the tasks, then merge; ``False`` returns once they are submitted.
        max_restarts: how often a local worker that died without a result is started again.
    Raises:
        ConfigError: submitit missing, or not on a Slurm cluster for ``slurm``.
        DataError: a task failed (after the others finished; the error names the task).
    """
    submitit = require_submitit()
    out = Path(manifest.out)
    job_fn = ShardJob()
    if manifest.launcher == "local":
        devices = list(devices)
        manifest.devices = devices
        per_worker: list[list[list[str]]] = [[] for _ in devices]
        jobs: list[Any] = []
        executors = []
        for w, dev in enumerate(devices):
            params, inner = local_worker_parameters(dev)
            ex = submitit.LocalExecutor(folder=out / LAUNCH_DIR / "logs")
            # timeout: the local controller kills a job after timeout_min; a launched run may take days
            ex.update_parameters(timeout_min=60 * 24 * 30, **params)
            # tasks dealt round-robin: worker w runs tasks w, w + D, w + 2D, ... one after another
            per_worker[w] = [with_device(t.argv, inner) for t in manifest.tasks[w::len(devices)]]
            executors.append(ex)
            jobs.append(ex.submit(job_fn, per_worker[w]) if per_worker[w] else None)
        manifest.job_ids = [str(j.job_id) if j is not None else "" for j in jobs]
        manifest.save()
        if not wait:
            echo(f"started {len(manifest.tasks)} tasks on {len(devices)} local workers (pids {', '.join(manifest.job_ids)}); "
                 f"`medfocus status {out}` shows progress, `medfocus merge {out}` combines the shards")
            return manifest
        restarts = [0] * len(jobs)
        failures: list[str] = []

        def resubmit(w: int) -> bool:
            if restarts[w] >= max_restarts:
                return False
            restarts[w] += 1
            echo(f"worker {w} ({devices[w]}) died without a result; restart {restarts[w]}/{max_restarts} (resumes from its store)")
            jobs[w] = executors[w].submit(job_fn, per_worker[w])
            manifest.job_ids[w] = str(jobs[w].job_id)
            manifest.save()
            return True

        _wait(manifest, jobs, progress=progress, on_dead=resubmit, failures=failures, echo=echo)
    elif manifest.launcher == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=out / "slurm")
        except RuntimeError as exc:
            raise ConfigError(f"--launcher slurm: {exc} (use --launcher local on a single machine)") from None
        ex.update_parameters(**(slurm or {}))
        jobs = ex.map_array(job_fn, [[with_device(t.argv, device)] for t in manifest.tasks])
        manifest.job_ids = [str(j.job_id) for j in jobs]
        manifest.save()
        if not wait:
            echo(f"submitted a Slurm array of {len(jobs)} tasks (job {manifest.job_ids[0].split('_')[0]}); "
                 f"`medfocus status {out}` shows progress, `medfocus merge {out}` combines the shards")
            return manifest
        failures = []
        _wait(manifest, jobs, progress=progress, on_dead=lambda w: False, failures=failures, echo=echo)
    else:
        raise ConfigError(f"launcher {manifest.launcher!r} is not one of local, slurm")
    if failures:
        raise DataError("launched tasks failed (the other shards are complete; fix the cause and rerun the same "
                        "command to resume):\n  " + "\n  ".join(failures))
    for line in merge_outputs(out):
        echo(f"merged: {line}")
    manifest.merged_into = ["predictions.jsonl"] if manifest.command == "attribute" else ["<model>/<dataset>/<mode>.json"]
    manifest.save()
    return manifest


def _wait(manifest: Manifest, jobs: list[Any], *, progress: bool, on_dead: Callable[[int], bool], failures: list[str],
          echo: Callable[[str], None]) -> None:
    """Poll the jobs with a progress bar over records until all are finished."""
    from tqdm.auto import tqdm

    out = Path(manifest.out)
    total = sum(t.expected for t in manifest.tasks)
    pending = {w for w, j in enumerate(jobs) if j is not None}
    bar = tqdm(total=total, desc=f"{manifest.launcher}: {len(pending)} jobs", unit="rec", disable=not progress)
    n_jobs = len(pending)
    try:
        while pending:
            for w in sorted(pending):
                job = jobs[w]
                if not job.done():
                    continue
                outcome, message = _job_outcome(job)
                if outcome == "died" and on_dead(w):
                    continue  # restarted: the new job resumes from the store
                if outcome != "ok":
                    failures.append(f"job {job.job_id} ({outcome}): {message} (log: {job.paths.stderr})")
                pending.discard(w)
            done = sum(_count_done(out / t.output)[0] for t in manifest.tasks)
            bar.n = min(done, total)
            bar.set_postfix_str(f"{n_jobs - len(pending)}/{n_jobs} jobs finished")
            bar.refresh()
            if pending:
                time.sleep(POLL_SECONDS)
    finally:
        bar.close()
