"""Scale-out benchmark (issue 16): score sequences of the lstm-b64 shape on dask and Ray.

Inference: ``--n`` sequences (T=100, I=H=512, float32; default 20,000, 4.1 GB in and
4.1 GB out) in chunks of ``--chunk`` (64) sequences, on

- dask: ``distributed.LocalCluster`` worker processes running ``rnnfast.dask.predict``;
- Ray: ``ray.data.Dataset.map_batches(rnnfast.ray.Predictor)`` on ``ray.init(num_cpus=2)``,

each as 1 worker x 1 thread, 2 workers x 1 thread and 1 worker x 2 threads. The data
are on the cluster before the clock starts (scattered to the dask workers, put in Ray's
object store), and the outputs stay there (``persist`` / ``materialize``): the timed
region is the job itself.

Per-task overhead, two ways: the time per task on one worker minus the pure compute of
one chunk measured in this process just before and just after the job (with the same
thread count), and minus the compute time measured inside the tasks themselves (dask's
task stream; Ray: the Predictor's call), which stays meaningful when other processes
take CPU time during the job. That other load is measured too (system CPU time minus
this process tree's, in cores), and each measurement first waits (``--quiet-wait``) for
the machine to be quiet. Bytes per task: the task's own message (dask: the pickled
graph entry; Ray: the pickled constructor arguments), and the data chunk it reads and
writes.

Also measured: the central per-task cost (empty tasks per second through the dask
scheduler and through Ray), the bandwidth of moving chunks onto the cluster and back,
the fixed cost of a one-chunk job, and the data-parallel training step (``gradients``)
at lstm-train-b64 shapes on 2 workers against 1 (chunks of 32, new data each step).
The figures end with a model of 10, 100 and 1000 workers built from them.

Usage::

    python tools/scaleout_bench.py                       # all of it: about 10 minutes on 2 quiet cores
    python tools/scaleout_bench.py --n 4000 --frameworks dask --no-train
    python tools/scaleout_bench.py --json out.json       # also write the figures as JSON
    python tools/scaleout_bench.py --from-json out.json --bw 3.1e9    # tables and model again

Prints markdown tables (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

import rnnfast
import rnnfast.ray

T, I, H = 100, 512, 512              # lstm-b64 / lstm-train-b64 of BENCHMARKS.md
CONFIGS = [(1, 1), (2, 1), (1, 2)]   # (workers, threads per worker)
TRAIN_B = 64


# ------------------------------------------------------------------ measuring
def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu() -> dict:
    """CPU seconds of this process and each of its descendants, by pid."""
    import psutil
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


class Meter:
    """Wall time of a region, and the CPU other processes (not this process tree:
    the scheduler, the workers and Ray's daemons are in it) took meanwhile, in cores."""

    def __enter__(self):
        self._busy, self._tree, self._t = _busy_cpu_s(), _tree_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t
        tree = _tree_cpu()
        mine = sum(v - self._tree.get(pid, 0.0) for pid, v in tree.items())
        self.other = max(0.0, (_busy_cpu_s() - self._busy - mine) / self.wall)
        return False


def wait_quiet(max_wait: float, log, below: float = 0.25) -> float:
    """Wait (at most `max_wait` s) until other processes take less than `below` cores
    over a 2 s window; returns the other load of the last window."""
    t0 = time.perf_counter()
    while True:
        with Meter() as m:
            time.sleep(2.0)
        if m.other < below or time.perf_counter() - t0 >= max_wait:
            if m.other >= below:
                log(f"  (machine not quiet after {max_wait:.0f} s: other processes take {m.other:.2f} cores)")
            return m.other


def _median_time(fn, reps: int) -> float:
    fn()                                           # warm: packs, buffers, first-call costs
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _chunk(i: int, chunk: int, batch_first: bool) -> np.ndarray:
    """Chunk i of the data set: uniform [-1, 1) floats, distinct per chunk."""
    rng = np.random.default_rng(i)
    shape = (chunk, T, I) if batch_first else (T, chunk, I)
    a = rng.random(shape, dtype=np.float32)
    a *= 2
    a -= 1
    return a


def _sizes(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - s) for s in range(0, n, chunk)]


def local_compute(layer, chunk: int, nthreads: int, reps: int) -> float:
    """Seconds for one chunk of inference, in this process, on `nthreads` threads."""
    x = _chunk(0, chunk, False)
    with rnnfast.threads.limit(nthreads):
        return _median_time(lambda: layer(x), reps)


def local_train(layer, x, dy, nthreads: int, reps: int) -> float:
    def step():
        layer.forward(x, train=True)
        layer.backward(dy)
    with rnnfast.threads.limit(nthreads):
        t = _median_time(step, reps)
    layer.grads, layer._ctx = {}, None
    return t


def _train_data(step: int):
    # new inputs every step, as in training (and no result a scheduler could reuse);
    # small values: saturated gates would make the backward pass run on denormals
    rng = np.random.default_rng(100 + step)
    return (0.5 * rng.standard_normal((T, TRAIN_B, I), dtype=np.float32),
            rng.standard_normal((T, TRAIN_B, H), dtype=np.float32))


def _row(fw, w, t, n, ntasks, m, compute, in_task, task_bytes, in_bytes, out_bytes, fixed):
    per_task = m.wall * w / ntasks                 # one worker's share of the tasks, in series
    return {"framework": fw, "workers": w, "threads": t, "n": n, "tasks": ntasks, "wall_s": m.wall,
            "seq_per_s": n / m.wall, "per_task_s": per_task, "compute_s": compute,
            "overhead_s": per_task - compute, "overhead_pct": 100 * (per_task - compute) / compute,
            "in_task_s": in_task, "overhead_in_task_s": per_task - in_task,
            "overhead_in_task_pct": 100 * (per_task - in_task) / in_task, "other_cores": m.other,
            "task_msg_bytes": task_bytes, "data_in_bytes": in_bytes, "data_out_bytes": out_bytes,
            "fixed_s": fixed}


def _measure_config(layer, chunk, t, reps, quiet, log, job):
    """Wait for quiet, local compute, the job (in a Meter), local compute again."""
    wait_quiet(quiet, log)
    before = local_compute(layer, chunk, t, reps)
    with Meter() as m:
        info = job()
    after = local_compute(layer, chunk, t, reps)
    return m, (before + after) / 2, min(before, after), info


# ------------------------------------------------------------------ dask
@contextlib.contextmanager
def _dask_cluster(workers: int):
    import distributed
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def dask_noop_rate(client, ntasks: int = 2000) -> float:
    """Empty tasks per second through the scheduler (the central per-task cost)."""
    import distributed
    fut = client.map(int, range(ntasks))
    distributed.wait(fut)                          # warm
    del fut
    t0 = time.perf_counter()
    fut = client.map(abs, range(-ntasks, 0))
    distributed.wait(fut)
    return ntasks / (time.perf_counter() - t0)


def _scattered(client, arrays, workers):
    """A dask array (concatenated along the batch) of chunks scattered round-robin."""
    import dask.array as da
    import distributed
    futs = [client.scatter(a, workers=[workers[i % len(workers)]], hash=False) for i, a in enumerate(arrays)]
    distributed.wait(futs)
    return da.concatenate([da.from_delayed(f, a.shape, dtype=a.dtype) for f, a in zip(futs, arrays)], axis=1), futs


def bench_dask(layer, n: int, chunk: int, reps: int, quiet: float, log) -> tuple[list, dict]:
    import dask.array as da
    import distributed

    import rnnfast.dask
    rows, extra = [], {}
    sizes = _sizes(n, chunk)
    for w, t in CONFIGS:
        lay = rnnfast.LSTM(I, H, seed=0, num_threads=t)
        lay.load_state_dict(layer.state_dict())
        with _dask_cluster(w) as client:
            # the data onto the workers, spread evenly, before the clock starts
            names = list(client.scheduler_info()["workers"])
            futs, nbytes, t0 = [], 0, time.perf_counter()
            for i, c in enumerate(sizes):
                a = _chunk(i, c, False)
                nbytes += a.nbytes
                futs.append(client.scatter(a, workers=[names[i % w]], hash=False))
            distributed.wait(futs)
            scatter_bw = nbytes / (time.perf_counter() - t0)
            x = da.concatenate([da.from_delayed(f, (T, c, I), dtype=np.float32) for f, c in zip(futs, sizes)],
                               axis=1)
            log(f"dask {w}w x {t}t: {len(sizes)} chunks on the workers ({nbytes / 1e9:.2f} GB, "
                f"{scatter_bw / 1e9:.2f} GB/s scatter)")
            stream = {}

            def job(x=x, lay=lay, client=client, stream=stream):
                with distributed.get_task_stream(client) as ts:
                    y = rnnfast.dask.predict(lay, x).persist()
                    distributed.wait(y)
                stream["data"] = ts.data
                return y
            m, compute, cmin, y = _measure_config(layer, chunk, t, reps, quiet, log, job)
            comp = [s["stop"] - s["start"] for d in stream["data"] if "predict_block" in str(d["key"])
                    for s in d["startstops"] if s["action"] == "compute"]
            graph = dict(rnnfast.dask.predict(lay, x).__dask_graph__())
            msgs = [len(pickle.dumps(v)) for k, v in graph.items()
                    if "_predict_block" in str(k[0] if isinstance(k, tuple) else k)]
            # the bandwidth back: a few output chunks gathered to this process
            some = y.blocks[0, :8, 0] if len(sizes) >= 8 else y
            t1 = time.perf_counter()
            got = some.compute()
            gather_bw = got.nbytes / (time.perf_counter() - t1)
            del got, some, y, x, futs
            if w == 1 and t == 1:
                extra["dask_noop_tasks_per_s"] = dask_noop_rate(client)
            # the fixed cost of a job: one chunk already on the cluster, computed and kept there
            x1, f1 = _scattered(client, [_chunk(0, chunk, False)], names)
            t0 = time.perf_counter()
            distributed.wait(rnnfast.dask.predict(lay, x1).persist())
            one = time.perf_counter() - t0
            del x1, f1
        row = _row("dask", w, t, n, len(sizes), m, compute, float(np.mean(comp)), int(np.median(msgs)),
                   T * chunk * I * 4, T * chunk * H * 4, one - compute)
        row.update(compute_min_s=cmin, scatter_GBps=scatter_bw / 1e9, gather_GBps=gather_bw / 1e9)
        rows.append(row)
        log(f"  {row['seq_per_s']:.0f} seq/s; overhead {1e3 * row['overhead_s']:.1f} ms/task vs local compute "
            f"({row['overhead_pct']:.1f}%), {1e3 * row['overhead_in_task_s']:.1f} ms vs in-task "
            f"({row['overhead_in_task_pct']:.1f}%); other load {m.other:.2f} cores")
        gc.collect()
    return rows, extra


def train_dask(layer, steps: int, quiet: float, log) -> dict:

    import rnnfast.dask
    out = {}
    lay = rnnfast.LSTM(I, H, seed=0, num_threads=1)
    lay.load_state_dict(layer.state_dict())
    half = TRAIN_B // 2
    for w in (1, 2):
        with _dask_cluster(w) as client:
            names = list(client.scheduler_info()["workers"])
            times, others = [], []
            for s in range(steps + 1):                  # step 0 warms the workers
                xs, dys = _train_data(s)
                # each chunk its own key, as a data loader would hand them over
                # (not one whole-batch array that every task slices)
                xd, fx = _scattered(client, [xs[:, :half], xs[:, half:]], names)
                dyd, fdy = _scattered(client, [dys[:, :half], dys[:, half:]], names)
                if s:
                    wait_quiet(quiet / 4, log)
                with Meter() as m:
                    dx, _ = rnnfast.dask.gradients(lay, xd, dyd)
                    dx.compute()
                if s:
                    times.append(m.wall)
                    others.append(m.other)
                del xd, dyd, fx, fdy, dx
        out[w] = {"step_s": float(np.median(times)), "other_cores": float(np.mean(others))}
        log(f"dask training step, {w} worker(s): {out[w]['step_s']:.3f} s (other load "
            f"{out[w]['other_cores']:.2f} cores)")
    return out


# ------------------------------------------------------------------ Ray
class _TimedPredictor(rnnfast.ray.Predictor):
    """The Predictor, also reporting the time of its own call (in the first row of each
    batch; 0 in the others), so that the compute inside the actors can be summed."""

    def __call__(self, batch):
        t0 = time.perf_counter()
        out = super().__call__(batch)
        dt = np.zeros(len(batch[self.input_column]))
        dt[0] = time.perf_counter() - t0
        out["udf_s"] = dt
        return out


def ray_noop_rate(ray, ntasks: int = 2000) -> float:
    noop = ray.remote(num_cpus=1)(_noop)
    ray.get([noop.remote(i) for i in range(200)])
    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(ntasks)])
    return ntasks / (time.perf_counter() - t0)


def _noop(i):
    return i


@contextlib.contextmanager
def _ray_session(n: int):
    import ray
    import ray.data
    data_bytes = n * T * (I + H) * 4
    # room for the inputs and the outputs of one configuration at a time
    store = int(min(0.8 * _mem_total(), 1.3 * data_bytes + 2e9))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=store)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


def bench_ray(ray, layer, n: int, chunk: int, reps: int, quiet: float, log) -> tuple[list, dict]:
    import ray.data
    sizes = _sizes(n, chunk)
    rows, extra = [], {"ray_noop_tasks_per_s": ray_noop_rate(ray)}
    lay_ref = ray.put(layer)
    for w, t in CONFIGS:
        refs, t0 = [], time.perf_counter()
        for i, c in enumerate(sizes):
            refs.append(ray.put(_chunk(i, c, True)))
        put_bw = n * T * I * 4 / (time.perf_counter() - t0)
        ds = ray.data.from_numpy_refs(refs).materialize()        # Arrow blocks, one per chunk
        del refs
        in_block = ds.size_bytes() / max(1, ds.num_blocks())
        log(f"ray {w}w x {t}t: {ds.num_blocks()} blocks in the object store ({ds.size_bytes() / 1e9:.2f} GB, "
            f"{put_bw / 1e9:.2f} GB/s put)")

        def job(d, w=w, t=t):
            return d.map_batches(_TimedPredictor, fn_constructor_args=(lay_ref,),
                                 fn_constructor_kwargs={"input_column": "data"}, num_cpus=t,
                                 compute=ray.data.ActorPoolStrategy(size=w), batch_size=chunk,
                                 batch_format="numpy")
        m, compute, cmin, out = _measure_config(layer, chunk, t, reps, quiet, log, lambda ds=ds, job=job:
                                             job(ds).materialize())
        out_block = (out.size_bytes() - n * 8) / max(1, out.num_blocks())        # less the timing column
        in_task = out.sum("udf_s") / len(sizes)
        del out, ds
        gc.collect()
        # the fixed cost of a job (actor start-up included): one chunk
        one_ds = ray.data.from_numpy_refs([ray.put(_chunk(0, chunk, True))]).materialize()
        t0 = time.perf_counter()
        job(one_ds).materialize()
        one = time.perf_counter() - t0
        del one_ds
        msg = len(ray.cloudpickle.dumps(((lay_ref,), {"input_column": "data"})))
        row = _row("ray", w, t, n, len(sizes), m, compute, in_task, msg, int(in_block), int(out_block),
                   one - compute)
        row.update(compute_min_s=cmin, put_GBps=put_bw / 1e9)
        rows.append(row)
        log(f"  {row['seq_per_s']:.0f} seq/s; overhead {1e3 * row['overhead_s']:.1f} ms/task vs local compute "
            f"({row['overhead_pct']:.1f}%), {1e3 * row['overhead_in_task_s']:.1f} ms vs in-task "
            f"({row['overhead_in_task_pct']:.1f}%); other load {m.other:.2f} cores")
    return rows, extra


def train_ray(ray, layer, steps: int, quiet: float, log) -> dict:
    out = {}
    half = TRAIN_B // 2
    # 1 worker: each task reserves both CPUs (so the chunks run one at a time) and runs one thread
    for w, cpus in ((1, 2), (2, 1)):
        times, others = [], []
        for s in range(steps + 1):
            xs, dys = _train_data(s)
            if s:
                wait_quiet(quiet / 4, log)
            with Meter() as m:
                rnnfast.ray.gradients(layer, xs, dys, chunks=half, num_cpus=cpus, num_threads=1)
            if s:
                times.append(m.wall)
                others.append(m.other)
        out[w] = {"step_s": float(np.median(times)), "other_cores": float(np.mean(others))}
        log(f"ray training step, {w} worker(s): {out[w]['step_s']:.3f} s (other load "
            f"{out[w]['other_cores']:.2f} cores)")
    return out


# ------------------------------------------------------------------ report and model
def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(rows: list) -> str:
    head = ("| framework | workers x threads | seq/s | speed-up vs 1x1 | per task (ms) | local compute (ms) | "
            "overhead vs local (ms, %) | in-task compute (ms) | overhead vs in-task (ms, %) | other load (cores) | "
            "task message (B) | data in / out per task (MB) | fixed per job (s) |")
    lines = [head, "|" + "---|" * 13]
    base = {r["framework"]: r["seq_per_s"] for r in rows if r["workers"] == 1 and r["threads"] == 1}
    for r in rows:
        lines.append(f"| {r['framework']} | {r['workers']} x {r['threads']} | {r['seq_per_s']:.0f} | "
                     f"{r['seq_per_s'] / base[r['framework']]:.2f}x | {1e3 * r['per_task_s']:.1f} | "
                     f"{1e3 * r['compute_s']:.1f} | {1e3 * r['overhead_s']:.1f} ({r['overhead_pct']:.1f}%) | "
                     f"{1e3 * r['in_task_s']:.1f} | {1e3 * r['overhead_in_task_s']:.1f} "
                     f"({r['overhead_in_task_pct']:.1f}%) | {r['other_cores']:.2f} | {r['task_msg_bytes']} | "
                     f"{r['data_in_bytes'] / 1e6:.1f} / {r['data_out_bytes'] / 1e6:.1f} | {r['fixed_s']:.2f} |")
    return "\n".join(lines)


def _model_tables(res: dict, bw: float, workers=(10, 100, 1000)) -> str:
    """Throughput at many workers, modelled from this run's figures: compute per
    sequence (the quietest local measurement), per-task framework cost (overhead vs the
    in-task compute at 1 x 1), central task rate, fixed cost per job, and a network
    bandwidth `bw` (bytes/s per node)."""
    sh = res["shape"]
    chunk, n = sh["chunk"], sh["n"]
    b_in, b_out = sh["T"] * sh["I"] * 4, sh["T"] * sh["H"] * 4       # bytes per sequence
    G = res["weights_bytes"]
    out = []
    for fw in ("dask", "ray"):
        rows = [r for r in res["rows"] if r["framework"] == fw]
        r11 = next((r for r in rows if r["workers"] == 1 and r["threads"] == 1), None)
        if r11 is None:
            continue
        tau = min(r["compute_min_s"] for r in rows if r["threads"] == 1) / chunk
        o = max(0.0, r11["overhead_in_task_s"])
        R = res["extra"].get(f"{fw}_noop_tasks_per_s", float("inf"))
        F = max(0.0, r11["fixed_s"])
        per_worker = chunk / (chunk * tau + o)
        out.append(f"\n{fw}: {1e3 * tau:.2f} ms a sequence on 1 thread, {1e3 * o:.1f} ms framework cost a task, "
                   f"central rate {R:.0f} tasks/s, fixed {F:.2f} s a job, network {bw / 1e9:.2f} GB/s, "
                   f"{(b_in + b_out) / 1e3:.0f} kB a sequence in + out, weights {G / 1e6:.1f} MB\n")
        out.append("| workers | compute-bound seq/s | central-rate cap | one-node data cap | seq/s, workers read "
                   "and write their own data | seq/s, data through one node | "
                   f"time for {n} sequences, own data (s) |")
        out.append("|" + "---|" * 7)
        for W in workers:
            xc = W * per_worker
            xs = R * chunk
            xd = bw / (b_in + b_out)
            bcast = math.ceil(math.log2(W + 1)) * G / bw
            x_own = min(xc, xs)
            x_one = min(x_own, xd)
            # a job this small gives each worker one chunk at most: its time is the fixed
            # costs plus one chunk
            t_small = F + bcast + max(n / x_own, min(math.ceil(n / W), chunk) * tau + o)
            out.append(f"| {W} | {xc:,.0f} | {xs:,.0f} | {xd:,.0f} | {x_own:,.0f} | {x_one:,.0f} | {t_small:.2f} |")
        out.append("\n| workers | chunk for <= 5% overhead | chunk for the central rate (<= 50% busy) | "
                   f"chunk for >= 4 tasks a worker ({n} sequences) | chunk to use |")
        out.append("|" + "---|" * 5)
        c_over = o / (0.05 * tau)
        for W in (1, 2, *workers):
            c_sched = 2 * W / (R * tau)
            c_bal = n / (4 * W)
            use = max(8, 8 * math.ceil(max(c_over, c_sched) / 8))
            note = "" if use <= c_bal else f" (more than {n} sequences needed)"
            out.append(f"| {W} | >= {c_over:.0f} | >= {c_sched:.0f} | <= {c_bal:.0f} | {use}{note} |")
        tr = res.get(f"train_{fw}_s")
        if tr:
            t1 = tr.get("1", tr.get(1))["step_s"]
            t2 = tr.get("2", tr.get(2))["step_s"]
            t32 = res["train_local_1t_s"] / 2                 # forward + backward of 32 sequences
            comm2 = max(0.0, t2 - t32)
            k = 4                                             # fan-in of the gradient sum
            out.append(f"\n{fw} training, 32 sequences a worker (weak scaling): compute {t32:.3f} s a step, "
                       f"measured extra of the 2-worker step {comm2:.3f} s (1 worker: {t1:.3f} s for 64)\n")
            out.append("| workers | step (s), workers read their own data | seq/s | speed-up vs 1 worker | "
                       "step (s), data through one node | seq/s |")
            out.append("|" + "---|" * 6)
            for W in (2, *workers):
                reduce_t = math.ceil(math.log(W, k)) * k * G / bw
                bcast = math.ceil(math.log2(W)) * G / bw
                t_own = t32 + comm2 + reduce_t + bcast
                t_one = t_own + W * 32 * (2 * b_in + b_out) / bw
                out.append(f"| {W} | {t_own:.3f} | {32 * W / t_own:,.0f} | {W * t32 / t_own:.1f}x | {t_one:.3f} | "
                           f"{32 * W / t_one:,.0f} |")
    return "\n".join(out)


def report(res: dict, bw: float) -> None:
    """Print the measured figures and the model as markdown."""
    host, sh = res["host"], res["shape"]
    print(f"\nHost: {host['cpu']}, {host['vcpus']} vCPUs; Python {host['python']}, numpy {host['numpy']}, "
          + ", ".join(f"{m} {host[m]}" for m in ("dask", "distributed", "ray") if m in host))
    print(f"Shape: LSTM T={T}, I={I}, H={H}, float32; {sh['n']} sequences in chunks of {sh['chunk']}; "
          f"weights {res['weights_bytes'] / 1e6:.1f} MB (sent once per worker)\n")
    print(_table(res["rows"]))
    print()
    for r in res["rows"]:
        rates = ", ".join(f"{k[:-5]} {v:.2f} GB/s" for k, v in r.items() if k.endswith("GBps"))
        print(f"- {r['framework']} {r['workers']}x{r['threads']}: local compute of a chunk "
              f"{1e3 * r['compute_min_s']:.1f} ms at best; {rates}")
    for k, v in res["extra"].items():
        print(f"- {k}: {v:.0f}")
    if "train_local_1t_s" in res:
        print(f"\nTraining step, lstm-train-b64 (batch 64 in chunks of 32, 1 thread a worker, new data each step); "
              f"local whole batch on 1 thread: {res['train_local_1t_s']:.3f} s\n")
        print("| framework | 1 worker (s) | 2 workers (s) | speed-up | other load (cores) |\n|---|---|---|---|---|")
        for fw in ("dask", "ray"):
            tr = res.get(f"train_{fw}_s")
            if tr:
                a, b = tr.get("1", tr.get(1)), tr.get("2", tr.get(2))
                print(f"| {fw} | {a['step_s']:.3f} | {b['step_s']:.3f} | {a['step_s'] / b['step_s']:.2f}x | "
                      f"{a['other_cores']:.2f} / {b['other_cores']:.2f} |")
    print(f"\nTotal {res['total_s']:.0f} s; load average (1, 5, 15 min) at the start "
          f"{', '.join(f'{v:.2f}' for v in res.get('loadavg_start', ()))}, at the end "
          f"{', '.join(f'{v:.2f}' for v in res.get('loadavg_end', ()))}")
    print(f"\nModel (from the figures above; network {bw / 1e9:.2f} GB/s per node)")
    print(_model_tables(res, bw))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="sequences scored per configuration")
    ap.add_argument("--chunk", type=int, default=64, help="sequences per task")
    ap.add_argument("--frameworks", default="dask,ray")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each local compute measurement")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="wait at most this long (s) for other processes to go quiet before each job")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--from-json", help="print the tables and the model of a saved run instead of running")
    ap.add_argument("--bw", type=float, default=1.25e9,
                    help="network bandwidth per node for the model, bytes/s (default 10 Gbit/s)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        report(res, args.bw)
        return res
    if args.n < args.chunk or args.chunk < 1:
        ap.error("--n must be >= --chunk >= 1")
    fws = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = set(fws) - {"dask", "ray"}
    if bad:
        ap.error(f"--frameworks: unknown {sorted(bad)}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    # the one-chunk jobs of the dask runs send a chunk in the graph on purpose
    warnings.filterwarnings("ignore", message="Sending large graph")
    host = {"cpu": _cpu_model(), "vcpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "rnnfast": rnnfast.__version__, "numpy": np.__version__}
    for mod in ("dask", "distributed", "ray"):
        with contextlib.suppress(ImportError):
            host[mod] = __import__(mod).__version__
    log(f"host: {host}")
    layer = rnnfast.LSTM(I, H, seed=0)
    res = {"host": host, "shape": {"T": T, "I": I, "H": H, "chunk": args.chunk, "n": args.n},
           "weights_bytes": sum(v.nbytes for v in layer.parameters().values()), "rows": [], "extra": {},
           "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv)}
    t_start = time.perf_counter()
    if not args.no_train:
        wait_quiet(args.quiet_wait, log)
        res["train_local_1t_s"] = local_train(layer, *_train_data(0), 1, args.train_steps)
        log(f"local training step (whole batch of 64, 1 thread): {res['train_local_1t_s']:.3f} s")
    for fw in fws:
        if fw == "dask":
            rows, extra = bench_dask(layer, args.n, args.chunk, args.reps, args.quiet_wait, log)
            res["rows"] += rows
            res["extra"].update(extra)
            if not args.no_train:
                res["train_dask_s"] = train_dask(layer, args.train_steps, args.quiet_wait, log)
        else:
            with _ray_session(args.n) as ray:
                rows, extra = bench_ray(ray, layer, args.n, args.chunk, args.reps, args.quiet_wait, log)
                res["rows"] += rows
                res["extra"].update(extra)
                if not args.no_train:
                    res["train_ray_s"] = train_ray(ray, layer, args.train_steps, args.quiet_wait, log)
    res["total_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = os.getloadavg()
    report(res, args.bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
