"""ReplayBuffer cost per operation from 1k to 1M stored experiences, and bytes per experience.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_buffer.py            # full: up to 1M, ~2 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_buffer.py --short    # `make bench`: up to 100k, ~20 s

Experiences are small and realistic for the quickstart: a 6-token prompt, a 4-token response with
behaviour log-probs, a reward, a group id and a task id, in groups of 8 (one group = one prompt's
responses, the buffer's unit). For each size N the buffer is filled to N experiences, then:

- ``add``           one more group into a full buffer (``capacity`` = N groups, so the oldest leaves);
- ``sample_*``      ``sample(64 groups)`` — what one quickstart update draws — with every registered
                    sampler (``offpolicy.data.sampling.SAMPLERS``, default parameters), every group
                    inside the staleness bound (the staleness check runs, nothing is evicted);
- ``first_sample_*`` the first of those calls alone: it builds the sampler's index over the N stored
                    groups (once per buffer, and again after a compaction), timed once;
- ``evict_stale``   the staleness check alone, with nothing to evict;
- ``state_dict``    the buffer's part of a checkpoint (sizes up to 100k only).

Memory: ``tracemalloc`` counts every byte Python allocates while the experiences are built and added
(lists, floats, strings, dicts, the Experience and Group objects, the deque), divided by the number
of experiences; the RSS growth of the process while building the 1M pool is reported beside it.

Writes ``benchmarks/results/buffer.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

from offpolicy.data.buffer import Group, ReplayBuffer  # noqa: E402
from offpolicy.data.sampling import SAMPLERS  # noqa: E402
from offpolicy.experience import Experience  # noqa: E402

GROUP = 8
SAMPLE_GROUPS = 64


def make_groups(n_groups: int) -> list[Group]:
    """Distinct small groups: 6-token prompts, 4-token responses with log-probs (like "12+34=" -> "46<eos>").

    128 groups per policy version, as one quickstart rollout step makes; rewards vary within groups.
    """
    groups = []
    for g in range(n_groups):
        version = g // 128
        # as in rollout_groups: the prompt list and task id are shared by the group; response ids,
        # log-probs (distinct floats), group id string and info dict are per experience
        prompt, task_id = [4 + (g + j) % 90 for j in range(6)], f"p{g}"
        exps = [Experience(prompt, [5 + (g + i) % 10, 6 + i, 7, 2], reward=float((g + i) % 3 == 0),
                           behavior_logprobs=[-(g % 97 + k + i / 8) / 100 for k in range(4)], policy_version=version,
                           group_id=f"s{g // 128}:v{version}:{g % 128}:{task_id}", task_id=task_id,
                           info={"truncated": False})
                for i in range(GROUP)]
        groups.append(Group.of(exps))
    return groups


def per_op(fn, min_seconds: float, min_calls: int = 5) -> float:
    """Median seconds of one call of ``fn``."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(pool: list[Group], n_exp: int, min_seconds: float, with_state: bool) -> dict:
    n_groups = n_exp // GROUP
    row = {"experiences": n_exp, "groups": n_groups}
    now = pool[n_groups - 1].version  # the current policy version: nothing stored is too stale
    for sampling in ["uniform"] + sorted(set(SAMPLERS) - {"uniform"}):
        # a staleness bound far above the stored span: the scan runs, as in every real sample, but evicts nothing
        buf = ReplayBuffer(capacity=n_groups, sampling=sampling, max_staleness=10**9, seed=0)
        for g in pool[:n_groups]:
            buf.add(g)
        t0 = time.perf_counter()
        buf.sample(SAMPLE_GROUPS, current_version=now)
        row[f"first_sample_{sampling}_ms"] = (time.perf_counter() - t0) * 1e3
        extra = itertools.cycle(pool)  # groups to add into the full buffer (the oldest leaves)

        def add_many(k: int = 1_000) -> None:
            for _ in range(k):
                buf.add(next(extra))

        if sampling == "uniform":
            row["add_us"] = per_op(add_many, min_seconds / 4) * 1e6 / 1_000
            row["evict_stale_ms"] = per_op(lambda: buf.evict_stale(current_version=now), min_seconds / 4) * 1e3
        row[f"sample_{sampling}_ms"] = per_op(lambda: buf.sample(SAMPLE_GROUPS, current_version=now),
                                              min_seconds / 4, min_calls=3) * 1e3
        if sampling == "uniform" and with_state:
            row["state_dict_s"] = per_op(buf.state_dict, 0, min_calls=1)
        for g in pool[:n_groups]:  # the pool is shared between buffers: each one starts from fresh groups
            g.uses = 0
            g.__dict__.pop("mean_reward", None)  # the cached mean reward (functools.cached_property)
    return row


def memory_per_experience(n_exp: int) -> dict:
    """tracemalloc bytes per experience for building ``n_exp`` experiences and adding them to a buffer."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    buf = ReplayBuffer(capacity=n_exp // GROUP, max_staleness=None)
    for g in make_groups(n_exp // GROUP):
        buf.add(g)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_exp = (after - before) / n_exp
    one = make_groups(1)[0].experiences[0]
    return {"experiences": n_exp, "bytes_per_experience": round(per_exp),
            "tokens_per_experience": len(one.prompt_ids) + len(one.response_ids), "buffer_len_groups": len(buf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="sizes up to 100k (for `make bench`)")
    args = ap.parse_args()
    sizes = [1_000, 10_000, 100_000] if args.short else [1_000, 10_000, 100_000, 1_000_000]
    min_seconds = 0.4 if args.short else 1.0
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    pool = make_groups(max(sizes) // GROUP)
    build_s = time.perf_counter() - t0
    rss_per_exp = (proc.memory_info().rss - rss0) / max(sizes)
    print(f"built {max(sizes):,} experiences in {build_s:.1f} s; RSS growth {rss_per_exp:.0f} B/experience", flush=True)
    rows = []
    for n in sizes:
        rows.append(bench_size(pool, n, min_seconds, with_state=n <= 100_000))
        r = rows[-1]
        samples = ", ".join(f"{k[7:-3]} {v:.2f}" for k, v in r.items() if k.startswith("sample_"))
        print(f"  N={n:>9,}: add {r['add_us']:.2f} us, scan {r['evict_stale_ms']:.2f} ms, sample ms: {samples}",
              flush=True)
    del pool
    gc.collect()
    memory = [memory_per_experience(n) for n in ([10_000] if args.short else [10_000, 100_000])]
    smallest, largest = rows[0], rows[-1]
    result = {
        "benchmark": "buffer",
        "short": args.short,
        "machine": machine(),
        "setup": {"group_size": GROUP, "sample_groups": SAMPLE_GROUPS, "prompt_tokens": 6, "response_tokens": 4,
                  "timing": "median seconds per call"},
        "sizes": rows,
        "memory_tracemalloc": memory,
        "rss_bytes_per_experience": round(rss_per_exp),
        "rss_pool_experiences": max(sizes),
        "pool_build_seconds": round(build_s, 1),
        "add_growth": round(largest["add_us"] / smallest["add_us"], 1),
        "sample_uniform_growth": round(largest["sample_uniform_ms"] / smallest["sample_uniform_ms"], 1),
        "size_growth": largest["experiences"] // smallest["experiences"],
    }
    path = write_json("buffer", result)  # --short writes the same file; its "short" field says which
    print(f"\nwrote {path}\n")
    sample_keys = [k for k in rows[0] if k.startswith("sample_")]
    print(markdown_table(
        ["experiences (groups of 8)", "add one group", "staleness scan"]
        + [f"sample 64, {k[7:-3]}" for k in sample_keys] + ["state_dict"],
        [[f"{r['experiences']:,}", f"{r['add_us']:.2f} µs", f"{r['evict_stale_ms']:.2f} ms"]
         + [f"{r[k]:.2f} ms" for k in sample_keys]
         + [f"{r['state_dict_s']:.2f} s" if "state_dict_s" in r else "—"] for r in rows]))
    print()
    first_keys = [k for k in rows[0] if k.startswith("first_sample_")]
    print(markdown_table(["experiences"] + [f"first sample 64, {k[13:-3]}" for k in first_keys],
                         [[f"{r['experiences']:,}"] + [f"{r[k]:.2f} ms" for k in first_keys] for r in rows]))
    print()
    print(markdown_table(["experiences", "bytes / experience (tracemalloc)", "tokens / experience"],
                         [[f"{m['experiences']:,}", f"{m['bytes_per_experience']:,}", m["tokens_per_experience"]]
                          for m in memory]))
    print(f"RSS growth while building {max(sizes):,} experiences: {rss_per_exp:.0f} B/experience")


if __name__ == "__main__":
    main()
