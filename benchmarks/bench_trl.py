"""Side by side with TRL's GRPOTrainer: rollouts and wall-clock to a held-out accuracy target.

    .venv/bin/pip install -c constraints.txt -e ".[bench]"            # trl (CPU torch stays pinned)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py --short   # `make bench`: 1 seed, ~1.5 min (~5 if shared)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py --seeds 3 # 3 seeds, longer runs, ~8 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py --seeds 3 --first-seed 9   # seeds 9-11
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py --reuse --seeds 12 --name trl_comparison_pooled
                                                                      # all 12 seeds' runs, one target
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py --short --start runs/sft_chain_sum/checkpoints/sft \
        --task reasoning_gym:chain_sum --task-params '{"min_terms": 2, "max_terms": 2, "instruction": ""}'

Any task and start (defaults: 2-digit addition from the fixture below, unchanged): ``--start DIR``
is an offpolicy tiny-model checkpoint; ``--task NAME`` / ``--task-params JSON`` default to the task
of the run that wrote it (``<run>/config.yaml`` next to ``<run>/checkpoints/DIR``) and are passed to
every system (``make_task(NAME, **params)``; our recipes get ``task.name``/``task.params``
overrides); ``--max-new-tokens`` defaults to that run's ``sampling.max_new_tokens``, else the
longest answer + 1 (EOS); the recipes' ``policy.{d_model,n_layers,n_heads,max_len}`` are set to the
checkpoint's, and the longest prompt + ``max_new_tokens`` must fit in its ``max_len``. Another task or start writes ``trl_comparison[_full]_<task>.json``
and runs in ``runs/bench_trl/<task>/`` unless ``--name`` / ``--work`` say otherwise.

All systems start from the same weights: the shipped SFT checkpoint
``tests/fixtures/tiny_addition_sft`` (0.41M-parameter tiny GPT, ~28% held-out greedy accuracy on
2-digit addition), exported for TRL as an equivalent ``transformers`` GPT-2 with
``offpolicy.policy.export.export_hf`` (same logits to 1e-5, same greedy generations; see
``tests/unit/test_export.py``). Same machine, task (``addition``, 2-digit operands), prompts per
step, completions per prompt, completion length (6 tokens), temperature 1, learning rate 1e-4
(constant, AdamW, grad-norm clip 1.0), no KL / no reference model, and seed:

- ``trl``: ``trl.GRPOTrainer`` on CPU with ``transformers.generate`` (no vLLM), ``beta=0``,
  ``loss_type="grpo"`` (per-sequence mean, like our ``grpo`` loss), group-std-scaled rewards,
  one optimizer step per generation batch, reward = ``task.score`` on the original ``Problem`` (looked
  up by a ``problem_id`` dataset column, which TRL passes to the reward function), as our runner scores;
  TRL scores completions with a forward given no ``position_ids``, so its model is patched with
  ``offpolicy.policy.export.positions_from_mask`` (left-padded prompts numbered from the attention mask;
  ``tests/integration/test_trl_parity.py`` checks TRL's per-token log-probs equal ours);
- ``grpo_onpolicy``: ``recipes/grpo_onpolicy.yaml`` (one update per rollout step on the fresh groups);
- ``quickstart``: ``recipes/quickstart.yaml`` (off-policy: 4 updates per step, each on half the new
  number of groups, drawn from a replay buffer of groups at most 4 versions stale, PPO clip against
  the behaviour log-probs);
- ``rec_replay``: ``recipes/rec_replay.yaml`` (REC-OneSide-NoIS, arXiv:2509.24203: the same 4 x P/2 reuse,
  uniform sampling from groups at most 4 versions stale, one-sided clip mask, no importance weights);
- ``opmd_replay``: ``recipes/opmd_replay.yaml`` (OPMD, arXiv:2501.12599: the same reuse, soft-max group
  baseline and a squared log-ratio penalty to the behaviour policy);
- ``decoupled_tis``: ``recipes/decoupled_tis.yaml`` (the same reuse; PPO clip against the proximal
  policy and, separately, a token-level truncated weight proximal / behaviour: the decoupled
  objective an asynchronous runner uses, here on stale replayed groups);
- ``topr_reuse`` and ``psr_reuse``: 32 updates per step from groups at most 2 steps old (TOPR, and TOPR
  with the negatives' weight 0); all run with ``policy.init=<fixture> sft.steps=0``.

Held-out greedy accuracy is measured after every step on the same 300 eval-split problems for every
system (the runner's ``eval.n_problems=300`` set; TRL's model is evaluated with offpolicy's
``evaluate`` and an ``HFEngine`` from a ``TrainerCallback``). Our runs have a fixed number of steps;
TRL stops at the highest reported target or when its training-time budget is spent. The headline
target is start + 0.20 (``--gain``); ``by_gain`` reads the same runs at +0.10, +0.20 and +0.30. A
system that never reaches a target is charged its whole budget, and the ratio is then a lower bound
(``*_is_lower_bound``).

Wall-clock is training time with evaluations excluded: ours is the runner's sum of ``time/step_s``
(rollout + learning), TRL's the sum of its optimizer steps (``on_step_begin`` → ``on_step_end``:
generation + scoring + forward/backward + optimizer). Other jobs sharing the 2 cores slow some steps
down ~8x, so each worker first waits (≤ 60 s) for idle cores, and the ratio is also given for quiet
cores (``wallclock_quiet_*``): steps to target × the run's quiet step time (median of its fastest
quarter of steps; ``disturbed_step_fraction`` says how many steps were slowed). Token rates are
quiet rates the same way. Each system runs in its own process, so ``peak_rss_mb`` is its own
(glibc's heap included). ``--reuse`` summarises the runs of an earlier invocation again.

Writes ``benchmarks/results/trl_comparison.json`` (``--short``, what ``make bench`` runs) or
``benchmarks/results/trl_comparison_full.json`` (without ``--short``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from offpolicy.baselines.trl_grpo import eval_seed, peak_rss_mb, run_trl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "tests" / "fixtures" / "tiny_addition_sft"
RECIPES = {name: ROOT / "recipes" / f"{name}.yaml"
           for name in ("grpo_onpolicy", "quickstart", "rec_replay", "opmd_replay", "decoupled_tis", "topr_reuse",
                        "psr_reuse")}
# our off-policy recipes in the comparison, as shipped (none tuned on this benchmark but psr_reuse's minibatch)
OFFPOLICY = ("quickstart", "rec_replay", "opmd_replay", "decoupled_tis", "topr_reuse", "psr_reuse")
HALF_BATCH = ("quickstart", "rec_replay", "opmd_replay", "decoupled_tis")  # 4 updates x (P/2) groups per P new groups
# The recipe whose ratios are the headline keys, declared before its runs (no pick-the-best after the fact).
# psr_reuse (negative weight 0) was chosen from diagnostics on seeds 0-2 and its minibatch (32 updates x 8 groups
# per step) on seeds 0-5: seeds 6-14 (--first-seed 6, 9, 12) are the check no choice was made on.
HEADLINE = "psr_reuse"
SYSTEMS = ("trl", "grpo_onpolicy", *OFFPOLICY)
NAMES = {"trl": "TRL GRPOTrainer", "grpo_onpolicy": "offpolicy on-policy GRPO",
         "quickstart": "offpolicy off-policy (quickstart)", "rec_replay": "offpolicy off-policy (rec_replay)",
         "opmd_replay": "offpolicy off-policy (opmd_replay)",
         "decoupled_tis": "offpolicy off-policy (decoupled_tis)", "topr_reuse": "offpolicy off-policy (topr_reuse)",
         "psr_reuse": "offpolicy off-policy (psr_reuse)"}
COLORS = {"trl": "tab:red", "grpo_onpolicy": "tab:blue", "quickstart": "tab:green", "rec_replay": "tab:brown",
          "opmd_replay": "tab:olive", "decoupled_tis": "tab:gray", "topr_reuse": "tab:purple",
          "psr_reuse": "tab:orange"}
GAINS = (0.10, 0.20, 0.30)  # targets reported from the same runs (the headline is --gain, default 0.20)
TASK = {"name": "addition", "params": {"min_digits": 2, "max_digits": 2}}  # the default task (with SFT)
MAX_NEW_TOKENS, TEMPERATURE, LR = 6, 1.0, 1e-4  # MAX_NEW_TOKENS: the default task's; others: see run_spec
DEFAULT_TITLE = "2-digit addition, 0.41M tiny GPT from SFT"

SHORT = {"prompts_per_step": 128, "group_size": 8, "eval_problems": 300, "eval_every": 1,
         "ours_steps": {"grpo_onpolicy": 60, "quickstart": 30, "rec_replay": 30, "opmd_replay": 30, "decoupled_tis": 30,
                        "topr_reuse": 12, "psr_reuse": 12}, "trl_budget_s": 240.0,
         "trl_max_steps": 400}
FULL = {**SHORT, "ours_steps": {"grpo_onpolicy": 100, "quickstart": 40, "rec_replay": 40, "opmd_replay": 40,
                          "decoupled_tis": 40, "topr_reuse": 20, "psr_reuse": 20}, "trl_budget_s": 400.0,
        "trl_max_steps": 800}


def start_accuracy(seed: int, s: dict[str, Any]) -> float:
    """Held-out greedy accuracy of the start checkpoint on the eval set every system uses for ``seed``."""
    from offpolicy.data.tasks import make_task
    from offpolicy.policy.model import load_policy
    from offpolicy.rollout.engines import TinyEngine
    from offpolicy.train.evaluate import evaluate

    task = make_task(s["task"]["name"], **s["task"]["params"])
    problems = task.problems(s["eval_problems"], split="eval", seed=eval_seed(seed))
    policy = load_policy(ROOT / s["init"])
    engine = TinyEngine(policy)
    return evaluate(engine, policy.tokenizer, problems, task.score, max_new_tokens=s["max_new_tokens"],
                    samples=0)["eval/greedy_acc"]


def run_spec(start: Path, task_name: str | None, task_params: dict | None,
             max_new_tokens: int | None) -> dict[str, Any]:
    """Start checkpoint, task and sizes every system shares, checked before any run.

    The task and ``max_new_tokens`` come from the flags, else from the start checkpoint's run
    (``<run>/config.yaml`` for a checkpoint in ``<run>/checkpoints/``), else -- for the shipped fixture --
    2-digit addition with 6 tokens; a task without either gets its longest answer (over 512 train
    problems) + 1 for EOS. ``shape`` is the checkpoint's (the recipes' ``policy.*`` sizes must match
    it); ``max_len`` is its context: the longest prompt (of 512 train problems) + ``max_new_tokens``
    must fit in it.
    """
    import yaml

    from offpolicy.data.tasks import make_task
    from offpolicy.policy.model import load_policy

    policy = load_policy(start)
    if policy.kind != "tiny":
        raise SystemExit(f"--start {start}: bench_trl compares on the built-in tiny model, got a {policy.kind!r} policy")
    run_cfg = start.parent.parent / "config.yaml" if start.parent.name == "checkpoints" else None
    recorded = yaml.safe_load(run_cfg.read_text()) if run_cfg and run_cfg.exists() else None
    if recorded:
        task = {"name": recorded["task"]["name"], "params": recorded["task"].get("params") or {}}
        default_new = recorded["sampling"]["max_new_tokens"]
    elif start.resolve() == SFT.resolve():
        task, default_new = TASK, MAX_NEW_TOKENS
    else:
        task, default_new = None, None
    if task_name is not None:  # an explicit task keeps the recorded max_new_tokens only if it is the same task
        if task is None or task_name != task["name"] or (task_params or {}) != task["params"]:
            default_new = None
        task = {"name": task_name, "params": task_params or {}}
    elif task_params is not None:
        if task is None:
            raise SystemExit("--task-params needs --task (the start checkpoint records no task)")
        task = {"name": task["name"], "params": task_params}
    if task is None:
        raise SystemExit(f"--start {start}: no run config.yaml next to it names a task: give --task")
    try:
        t = make_task(task["name"], **task["params"])
    except (KeyError, ValueError, ImportError) as e:
        raise SystemExit(f"--task {task['name']} --task-params {json.dumps(task['params'])}: {e}") from None
    tok = policy.tokenizer
    sample = t.problems(512, split="train", seed=0)
    new = max_new_tokens or default_new or max(len(tok.encode(p.answer)) for p in sample) + 1
    c = policy.model.cfg
    max_len = c.max_len
    longest = max(len(tok.encode(p.prompt)) for p in sample)
    if longest + new > max_len:
        raise SystemExit(f"--start {start} has max_len={max_len}: prompts of up to {longest} tokens + "
                         f"max_new_tokens={new} do not fit")
    init = start.resolve()
    return {"task": task, "init": str(init.relative_to(ROOT)) if init.is_relative_to(ROOT) else str(init),
            "max_new_tokens": new, "max_len": max_len, "longest_train_prompt": longest,
            "shape": {"d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "max_len": max_len}}


# ---- worker: offpolicy (one recipe, one seed) -------------------------------------------------
def run_ours(label: str, seed: int, s: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from offpolicy.config import load_config
    from offpolicy.report.metrics import read_metrics
    from offpolicy.train import learner as learner_mod
    from offpolicy.train.runner import train

    learned = {"tokens": 0.0, "seconds": 0.0, "updates": 0, "threads": None, "rates": []}
    original = learner_mod.Learner.update

    def counted(self, batch):  # learner tokens/s: response tokens learned from per second of update
        t0 = time.perf_counter()
        metrics = original(self, batch)  # rows the loss declares zero are skipped, and not counted
        dt, n = time.perf_counter() - t0, float(metrics["train/active_tokens"])
        learned["seconds"] += dt
        learned["tokens"] += n
        learned["rates"].append(round(n / dt, 1))
        learned["updates"] += 1
        learned["threads"] = torch.get_num_threads()
        return metrics

    learner_mod.Learner.update = counted
    P, G = s["prompts_per_step"], s["group_size"]
    overrides = [f"policy.init={ROOT / s['init']}", *(f"policy.{k}={v}" for k, v in s["shape"].items()),
                 f"task.name={s['task']['name']}", f"task.params={json.dumps(s['task']['params'])}",
                 "sft.steps=0", f"rl.steps={s['ours_steps'][label]}",
                 f"rl.prompts_per_step={P}", f"rl.group_size={G}", f"sampling.max_new_tokens={s['max_new_tokens']}",
                 f"sampling.temperature={TEMPERATURE}", f"rl.optim.lr={LR}",
                 f"eval.every={s['eval_every']}", f"eval.n_problems={s['eval_problems']}", "eval.samples=0",
                 "run.checkpoint_every=0", "run.progress=false", "run.threads=2",
                 f"run.seed={seed}", f"run.out_dir={out}", f"run.name=bench_trl/{label}/seed{seed}"]
    if label in HALF_BATCH:  # keep the recipe's reuse: 4 updates x (P/2) groups per P new groups
        overrides.append(f"rl.groups_per_update={P // 2}")
    elif label == "grpo_onpolicy":
        overrides.append(f"rl.groups_per_update={P}")
    # topr_reuse / psr_reuse keep their own minibatch and updates per step whatever P is
    cfg = load_config(RECIPES[label], overrides)
    if out.exists():
        shutil.rmtree(out)
    summary = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if r.get("stage") == "rl" and "reward/mean" in r]
    cum, seconds, gen_s, gen_tok = 0.0, {0: 0.0}, 0.0, 0.0
    step_times = [round(r["time/step_s"], 4) for r in steps]
    for r in steps:
        cum += r["time/step_s"]
        seconds[r["step"]] = cum
        tps = r.get("rollout/tokens_per_s")
        if tps:
            n = r["rollout/response_len"] * P * G  # response tokens generated this step
            gen_tok += n
            gen_s += n / tps
    curve = []
    for r in rows:
        point = str(r.get("eval_point", ""))
        if "eval/greedy_acc" in r and (point in ("before_rl", "final") or point.startswith("rl_step_")):
            step = 0 if point == "before_rl" else r["step"]
            curve.append({"step": step, "rollouts": r["rollouts"], "seconds": round(seconds.get(step, cum), 3),
                          "acc": r["eval/greedy_acc"]})
    return {"system": label, "seed": seed, "overrides": overrides, "curve": _dedupe(curve),
            "steps": len(steps), "rollouts": summary["rollouts"], "train_seconds": round(cum, 2),
            "step_seconds": step_times,
            "rollout_tokens": gen_tok, "rollout_seconds": round(gen_s, 2),
            "rollout_tokens_per_s": gen_tok / gen_s if gen_s else None,
            "learner_tokens": learned["tokens"], "learner_seconds": round(learned["seconds"], 2),
            "learner_tokens_per_s": learned["tokens"] / learned["seconds"] if learned["seconds"] else None,
            "learner_updates": learned["updates"],
            "rollout_tokens_per_s_per_step": [round(r["rollout/tokens_per_s"], 1) for r in steps],
            "learner_tokens_per_s_per_update": learned["rates"], "torch_threads": learned["threads"],
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _dedupe(curve: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for p in curve:
        by_step[p["step"]] = p
    return [by_step[k] for k in sorted(by_step)]


# ---- worker: TRL GRPOTrainer -------------------------------------------------------------------
# ---- driver ------------------------------------------------------------------------------------
def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over ``seconds`` (from /proc/stat; 0.0 where it does not exist)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until other jobs use under ``threshold`` of the cores; returns the
    seconds waited and the last busy fraction measured. Bounds the damage of other jobs, it does not
    prevent them from starting mid-run."""
    t0 = time.perf_counter()
    busy = cpu_busy()
    while busy > threshold and time.perf_counter() - t0 < max_wait_s:
        time.sleep(4.0)
        busy = cpu_busy()
    return round(time.perf_counter() - t0, 1), round(busy, 2)


def spawn(system: str, seed: int, settings: dict, work: Path, target: float | None,
          reuse: bool = False) -> dict[str, Any]:
    result = work / f"{system}_seed{seed}.json"
    if reuse and result.exists():  # --reuse: summarise the runs of an earlier invocation again
        return json.loads(result.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--seed", str(seed),
           "--settings", json.dumps(settings), "--work", str(work), "--result", str(result)]
    if target is not None:
        cmd += ["--target", repr(target)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    waited, busy = wait_for_quiet(settings.get("max_wait_for_quiet_s", 60.0))
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    subprocess.run(cmd, check=True, env=env)
    data = json.loads(result.read_text())
    data["load_average_1m_before_after"] = [load0, round(os.getloadavg()[0], 2)]
    data["waited_for_quiet_s"], data["cpu_busy_at_start"] = waited, busy
    data["process_seconds"] = round(time.perf_counter() - t0, 1)
    result.write_text(json.dumps(data, indent=2))  # with the driver's measurements, for --reuse
    print(f"[bench_trl] {system} seed {seed}: {data['steps']} steps, {data['rollouts']} rollouts, "
          f"{data['train_seconds']} s training, final acc {data['curve'][-1]['acc']:.3f}, "
          f"{data['process_seconds']} s in all", flush=True)
    return data


def first_reach(curve: list[dict], target: float) -> dict | None:
    for p in curve:
        if p["acc"] >= target - 1e-9:
            return p
    return None


def cost_to_target(runs: list[dict], target: float, key: str, budget_key: str) -> tuple[float | None, bool, list]:
    """Mean over seeds of ``key`` at the first evaluation reaching ``target``; a seed that never reaches it
    counts with its whole budget (its last point), which makes the mean a lower bound."""
    vals, lower = [], False
    for r in runs:
        hit = first_reach(r["curve"], target)
        if hit is None:
            lower = True
            vals.append(r[budget_key] if budget_key in r else r["curve"][-1][key])
        else:
            vals.append(hit[key])
    return (sum(vals) / len(vals) if vals else None), lower, vals


def quiet_step_s(step_seconds: list[float]) -> float:
    """Median of the fastest quarter of a run's steps: its step time on undisturbed cores.

    Every step of a run does about the same work (same prompts x completions, same updates), but other
    jobs sharing the 2 cores slow some steps down ~8x (two 2-thread jobs on 2 cores); a quiet estimate
    needs only a quarter of the steps to be undisturbed."""
    fastest = sorted(step_seconds)[: max(1, len(step_seconds) // 4)]
    return statistics.median(fastest)


def quiet_rate(rates: list[float]) -> float | None:
    """Median of the fastest quarter of per-step (per-update) token rates: the rate on undisturbed cores."""
    if not rates:
        return None
    return statistics.median(sorted(rates, reverse=True)[: max(1, len(rates) // 4)])


def disturbed_fraction(step_seconds: list[float]) -> float:
    """Fraction of steps slower than twice the quiet step time (the run shared its cores)."""
    q = quiet_step_s(step_seconds)
    return sum(t > 2 * q for t in step_seconds) / len(step_seconds)


def quiet_cost(runs: list[dict], target: float) -> tuple[float | None, bool, list]:
    """Steps to target x the run's quiet step time: the wall-clock to target on undisturbed cores."""
    vals, lower = [], False
    for r in runs:
        hit = first_reach(r["curve"], target)
        lower |= hit is None
        steps = hit["step"] if hit else r["steps"]
        vals.append(steps * quiet_step_s(r["step_seconds"]))
    return (sum(vals) / len(vals) if vals else None), lower, vals


def ratio(num: tuple, den: tuple) -> tuple[float | None, bool | None]:
    """num/den of two cost_to_target results; a lower bound when only num is a lower bound, unknown when den is."""
    (a, a_lb, _), (b, b_lb, _) = num, den
    if a is None or b is None or b <= 0:
        return None, None
    if b_lb:  # ours never reached the target: no ratio can be claimed
        return None, None
    return round(a / b, 2), a_lb


def ratios(cost: dict[str, dict[str, tuple]], off: str) -> dict[str, Any]:
    """The comparison's ratios for off-policy recipe ``off`` from per-system costs to one target (see
    ``cost_to_target``)."""
    out: dict[str, Any] = {}
    for name, num, den in (("vs_trl", "trl", off), ("vs_onpolicy", "grpo_onpolicy", off),
                           ("onpolicy_vs_trl", "trl", "grpo_onpolicy")):
        for key, metric in (("rollouts", "rollouts"), ("wallclock", "seconds"),
                            ("wallclock_quiet", "quiet_seconds")):
            prefix = "onpolicy_" if name == "onpolicy_vs_trl" else ""
            suffix = "vs_trl" if name == "onpolicy_vs_trl" else name
            value, lower = ratio(cost[num][metric], cost[den][metric])
            out[f"{prefix}{key}_ratio_{suffix}"] = value
            out[f"{prefix}{key}_ratio_{suffix}_is_lower_bound"] = lower
    return out


def generation_limit() -> dict[str, Any]:
    """``generation_fraction_of_limit`` as measured by bench_generation.py (the issue wants it in this file too)."""
    path = ROOT / "benchmarks" / "results" / "generation.json"
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"generation_fraction_of_limit": None, "generation_fraction_of_limit_source": "not measured yet"}
    return {"generation_fraction_of_limit": gen.get("generation_fraction_of_limit"),
            "generation_fraction_of_limit_source": f"{path.relative_to(ROOT)} ({gen.get('date')}, "
                                                   f"short={gen.get('short')}; bench_generation.py)"}


def json_object(text: str) -> dict:
    """``--task-params``: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"min_terms\": 2}}', got {text!r}")
    return value


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true",
                    help="the `make bench` version (1 seed, ~1.5 min on idle cores)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: 1 with --short, else 3)")
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--trl-budget-s", type=float, default=None, help="TRL's training-time budget per seed")
    ap.add_argument("--ours-steps", type=str, default=None,
                    help="RL steps per recipe, e.g. grpo_onpolicy=50,quickstart=20,topr_reuse=10")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first..first+N-1 (e.g. 3 to check recipes on seeds they were not tuned on)")
    ap.add_argument("--trl-max-steps", type=int, default=None)
    ap.add_argument("--gain", type=float, default=0.20, help="target = mean start accuracy + gain")
    ap.add_argument("--task", type=str, default=None,
                    help="task name, e.g. reasoning_gym:chain_sum (default: the start checkpoint's run's task; "
                         "2-digit addition for the shipped fixture)")
    ap.add_argument("--task-params", type=json_object, default=None,
                    help='task parameters as JSON, e.g. \'{"min_terms": 2, "max_terms": 2}\'')
    ap.add_argument("--start", type=Path, default=SFT,
                    help="offpolicy checkpoint folder every system starts from (default: the addition fixture)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="completion length (default: the start's run's, else the longest answer + 1)")
    ap.add_argument("--work", type=Path, default=None,
                    help="run folder (default runs/bench_trl/{short,full}; runs/bench_trl/<task>/... for other tasks)")
    ap.add_argument("--max-wait-for-quiet-s", type=float, default=None,
                    help="before each run, wait at most this long for idle cores (default 60)")
    ap.add_argument("--reuse", action="store_true",
                    help="summarise finished runs found in --work instead of re-running them")
    ap.add_argument("--name", type=str, default=None,
                    help="results file name without .json (e.g. trl_comparison_pooled with --reuse --seeds 12; "
                         "default trl_comparison[_full], with _<task> for other tasks or starts)")
    # internal: one system in its own process
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--settings", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--target", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        settings = json.loads(a.settings)
        out = a.work / a.worker / f"seed{a.seed}"
        if a.worker == "trl":
            res = run_trl(a.seed, {**settings, "init": str(ROOT / settings["init"])}, out, a.target)
        else:
            res = run_ours(a.worker, a.seed, settings, out)
        a.result.write_text(json.dumps(res, indent=2))
        return

    s = json.loads(json.dumps(SHORT if a.short else FULL))
    spec = run_spec(a.start, a.task, a.task_params, a.max_new_tokens)
    s.update(spec)
    default_run = spec["task"] == TASK and a.start.resolve() == SFT.resolve()
    slug = "" if default_run else "_" + "".join(c if c.isalnum() else "_" for c in spec["task"]["name"])
    s["title"] = DEFAULT_TITLE if default_run else (
        f"{spec['task']['name']} {json.dumps(spec['task']['params'])}, tiny GPT from {spec['init']}")
    if a.prompts_per_step:
        s["prompts_per_step"] = a.prompts_per_step
    if a.group_size:
        s["group_size"] = a.group_size
    if a.trl_budget_s:
        s["trl_budget_s"] = a.trl_budget_s
    if a.trl_max_steps:
        s["trl_max_steps"] = a.trl_max_steps
    if a.max_wait_for_quiet_s is not None:
        s["max_wait_for_quiet_s"] = a.max_wait_for_quiet_s
    if a.ours_steps:
        for item in a.ours_steps.split(","):
            label, _, steps = item.partition("=")
            if label not in RECIPES or not steps.isdigit():
                ap.error(f"--ours-steps: {item!r} is not RECIPE=STEPS with RECIPE in {sorted(RECIPES)}")
            s["ours_steps"][label] = int(steps)
    n_seeds = a.seeds or (1 if a.short else 3)
    seed_list = list(range(a.first_seed, a.first_seed + n_seeds))
    a.work = a.work or ROOT / "runs" / "bench_trl" / slug.lstrip("_") / ("short" if a.short else "full")
    a.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # the start accuracy (same weights and held-out set for all three) fixes the targets before any run;
    # systems then alternate seed by seed, so a burst of other jobs on the shared cores is spread over them
    starts = [start_accuracy(seed, s) for seed in seed_list]
    start = mean(starts)
    target = round(start + a.gain, 4)
    gains = sorted({*GAINS, a.gain})
    runs: dict[str, list[dict]] = {k: [] for k in SYSTEMS}
    for seed, seed_start in zip(seed_list, starts):  # TRL runs on to the highest reported gain (or its budget)
        for k in SYSTEMS:
            runs[k].append(spawn(k, seed, s, a.work, round(start + max(gains), 4) if k == "trl" else None, a.reuse))
            if abs(runs[k][-1]["curve"][0]["acc"] - seed_start) > 1e-9:
                print(f"[bench_trl] WARNING: {k} seed {seed} starts at {runs[k][-1]['curve'][0]['acc']:.4f}, "
                      f"not {seed_start:.4f}", flush=True)
    trl_start = mean([r["curve"][0]["acc"] for r in runs["trl"]])

    cost = {k: {"rollouts": cost_to_target(runs[k], target, "rollouts", "rollouts"),
                "seconds": cost_to_target(runs[k], target, "seconds", "train_seconds"),
                "quiet_seconds": quiet_cost(runs[k], target)} for k in SYSTEMS}
    headline = ratios(cost, HEADLINE)
    per_recipe = {off: ratios(cost, off) for off in OFFPOLICY}
    by_gain = []
    for g in gains:
        t = round(start + g, 4)
        c = {k: {"rollouts": cost_to_target(runs[k], t, "rollouts", "rollouts"),
                 "seconds": cost_to_target(runs[k], t, "seconds", "train_seconds"),
                 "quiet_seconds": quiet_cost(runs[k], t)} for k in SYSTEMS}
        by_gain.append({"gain": g, "target_accuracy": t,
                        **{k: {"reached": sum(first_reach(r["curve"], t) is not None for r in runs[k]),
                               "rollouts": c[k]["rollouts"][2], "seconds": [round(v, 2) for v in c[k]["seconds"][2]],
                               "lower_bound": c[k]["rollouts"][1]} for k in SYSTEMS},
                        **ratios(c, HEADLINE), "by_recipe": {off: ratios(c, off) for off in OFFPOLICY}})

    systems: dict[str, Any] = {}
    for k in SYSTEMS:
        rs = runs[k]
        systems[k] = {
            "reached_target": sum(first_reach(r["curve"], target) is not None for r in rs), "of": len(rs),
            "rollouts_to_target": cost[k]["rollouts"][2],
            "seconds_to_target": [round(v, 2) for v in cost[k]["seconds"][2]],
            "to_target_is_lower_bound": cost[k]["rollouts"][1],
            "median_step_s": [statistics.median(r["step_seconds"]) for r in rs],
            "quiet_step_s": [quiet_step_s(r["step_seconds"]) for r in rs],
            "disturbed_step_fraction": [round(disturbed_fraction(r["step_seconds"]), 3) for r in rs],
            "quiet_seconds_to_target": [round(v, 2) for v in cost[k]["quiet_seconds"][2]],
            "start_acc": [r["curve"][0]["acc"] for r in rs], "final_acc": [r["curve"][-1]["acc"] for r in rs],
            "best_acc": [max(p["acc"] for p in r["curve"]) for r in rs],
            "steps": [r["steps"] for r in rs], "rollouts": [r["rollouts"] for r in rs],
            "train_seconds": [r["train_seconds"] for r in rs],
            "rollout_tokens_per_s_whole_run": mean([r["rollout_tokens_per_s"] for r in rs]),
            "learner_tokens_per_s_whole_run": mean([r["learner_tokens_per_s"] for r in rs]),
            "rollout_tokens_per_s": mean([quiet_rate(r["rollout_tokens_per_s_per_step"]) for r in rs]),
            "learner_tokens_per_s": mean([quiet_rate(r["learner_tokens_per_s_per_update"]) for r in rs]),
            "seconds_per_step": mean([r["train_seconds"] / max(r["steps"], 1) for r in rs]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "curves": [r["curve"] for r in rs],
            "runs": rs,
        }
    disturbed = [k for k in SYSTEMS if max(systems[k]["disturbed_step_fraction"]) > 0.10]
    if disturbed:
        print(f"[bench_trl] WARNING: other jobs slowed over 10% of the steps of {disturbed}; "
              "the quiet-cores wall-clock ratio is the one to read", flush=True)
    m = machine()
    m.update(runs["trl"][0].get("versions", {}))
    payload = {
        "benchmark": "trl_comparison", "short": a.short,
        "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/bench_trl.py",
                             *(x for x in sys.argv[1:] if x != "--reuse")]),
        "summarised_from_earlier_runs": a.reuse,
        "machine": m, "seeds": len(seed_list), "seed_list": seed_list,
        "settings": {"task": s["task"], "init": s["init"], "max_new_tokens": s["max_new_tokens"],
                     "temperature": TEMPERATURE, "lr": LR, **s},
        "start_accuracy": start, "start_accuracy_per_seed": starts, "trl_start_accuracy": trl_start,
        "target_accuracy": target, "target_rule": f"mean held-out greedy accuracy at the start of RL + {a.gain}",
        "best_offpolicy_recipe": HEADLINE,
        "headline_note": f"the headline ratios are {HEADLINE}'s, declared before the runs; ratios_by_recipe has "
                         "every off-policy recipe's",
        **headline,
        "ratios_by_recipe": per_recipe,
        "ratio_definition": "TRL's (or on-policy's) mean cost to the target divided by ours; > 1 means we need less. "
                            "A system that never reached the target is charged its whole budget (lower bound).",
        **generation_limit(),
        "disturbed_systems": disturbed,
        "disturbed_note": ("wall-clock of these systems was measured while other jobs slowed over 10% of their "
                           "steps: read wallclock_quiet_* rather than wallclock_*") if disturbed else None,
        "rates_definition": "rollout tokens/s: response tokens generated (EOS included) per second of generation; "
                            "learner tokens/s: response tokens in training batches per second of learning (ours: "
                            "Learner.update = proximal forward if any, forward, backward, optimizer; TRL: step time "
                            "minus generation = scoring, advantages, forward, backward, optimizer). Both are the "
                            "median "
                            "of the fastest quarter of steps (undisturbed cores); *_whole_run fields are run totals.",
        "rollout_tokens_per_s": {k: systems[k]["rollout_tokens_per_s"] for k in SYSTEMS},
        "learner_tokens_per_s": {k: systems[k]["learner_tokens_per_s"] for k in SYSTEMS},
        "peak_rss_mb": {k: systems[k]["peak_rss_mb"] for k in SYSTEMS},
        "by_gain": by_gain,
        "systems": systems,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "runs_seconds": round(sum(r.get("process_seconds", 0) + r.get("waited_for_quiet_s", 0)
                                  for k in SYSTEMS for r in runs[k]), 1),
    }
    name = a.name or (("trl_comparison" if a.short else "trl_comparison_full") + slug
                      + (f"_from_seed{a.first_seed}" if a.first_seed else ""))
    payload["plot"] = str(plot(payload, RESULTS / f"{name}.png").relative_to(ROOT))
    if a.reuse and a.name:  # a summary of stored runs: their curves and records stay in the per-set files
        for k in SYSTEMS:
            for key in ("curves", "runs"):
                systems[k].pop(key)
        payload["runs_are_in"] = f"the per-set trl_comparison_full*.json files (seeds {seed_list[0]}-{seed_list[-1]})"
    path = write_json(name, payload)
    print(report(payload))
    print(f"[bench_trl] wrote {path} in {payload['total_seconds']} s")


def plot(p: dict, path: Path) -> Path:
    """Held-out greedy accuracy vs rollouts and vs training seconds, one line per system and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "rollouts", "rollouts (completions sampled)"),
                             (axes[1], "seconds", "training seconds (evaluation excluded)")):
        for k in SYSTEMS:
            for i, curve in enumerate(p["systems"][k]["curves"]):
                ax.plot([c[xkey] for c in curve], [c["acc"] for c in curve], color=COLORS[k], lw=1.2, alpha=0.8,
                        label=NAMES[k] if i == 0 else None)
        ax.axhline(p["target_accuracy"], color="grey", ls="--", lw=1, label=f"target {p['target_accuracy']:.3f}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{p['settings'].get('title', DEFAULT_TITLE)}, {p['settings']['prompts_per_step']} prompts x "
                 f"{p['settings']['group_size']} per step, lr {p['settings']['lr']}, {p['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_cost(sys_: dict, key: str) -> str:
    vals = sys_["rollouts_to_target" if key == "rollouts" else "seconds_to_target"]
    v = mean(vals)
    if v is None:
        return "—"
    text = f"{v:,.0f}" if key == "rollouts" else f"{v:.1f}"
    return ("> " + text) if sys_["to_target_is_lower_bound"] else text


def report(p: dict) -> str:
    names = NAMES
    rows = []
    for k in SYSTEMS:
        sy = p["systems"][k]
        rows.append([names[k], f"{mean(sy['start_acc']):.3f}", f"{mean(sy['best_acc']):.3f}",
                     f"{sy['reached_target']}/{sy['of']}", _fmt_cost(sy, "rollouts"), _fmt_cost(sy, "seconds"),
                     f"{mean(sy['quiet_step_s']):.2f} ({mean(sy['median_step_s']):.2f})",
                     f"{mean(sy['disturbed_step_fraction']):.0%}", f"{sy['rollout_tokens_per_s']:,.0f}",
                     f"{sy['learner_tokens_per_s']:,.0f}", f"{sy['peak_rss_mb']:.0f}"])
    table = markdown_table(["system", "start acc", "best acc", "reached", "rollouts to target", "train s to target",
                            "quiet (median) s / step", "disturbed steps", "rollout tok/s", "learner tok/s",
                            "peak RSS MB"], rows)
    lb = lambda flag: " (lower bound)" if flag else ""  # noqa: E731
    gain_rows = []
    for g in p["by_gain"]:
        cell = lambda k: ("> " if g[k]["lower_bound"] else "") + f"{mean(g[k]['rollouts']):,.0f}"  # noqa: E731
        for off in OFFPOLICY:
            r = g["by_recipe"][off]
            gain_rows.append([f"+{g['gain']:.2f} ({g['target_accuracy']:.3f})", off, cell("trl"),
                              cell("grpo_onpolicy"), cell(off), r["rollouts_ratio_vs_trl"],
                              r["wallclock_ratio_vs_trl"], r["wallclock_quiet_ratio_vs_trl"],
                              r["rollouts_ratio_vs_onpolicy"]])
    gains = markdown_table(["target", "recipe", "TRL rollouts", "on-policy rollouts", "recipe's rollouts",
                            "rollouts ratio vs TRL", "wall-clock ratio vs TRL", "(quiet cores)",
                            "rollouts ratio vs on-policy"], gain_rows)
    return (f"headline recipe: {p['best_offpolicy_recipe']}\n"
            f"target held-out greedy accuracy {p['target_accuracy']:.3f} ({p['target_rule']})\n\n{table}\n\n{gains}\n\n"
            f"rollouts ratio vs TRL: {p['rollouts_ratio_vs_trl']}{lb(p['rollouts_ratio_vs_trl_is_lower_bound'])}; "
            f"wall-clock ratio vs TRL: {p['wallclock_ratio_vs_trl']}{lb(p['wallclock_ratio_vs_trl_is_lower_bound'])} "
            f"(quiet cores: {p['wallclock_quiet_ratio_vs_trl']}"
            f"{lb(p['wallclock_quiet_ratio_vs_trl_is_lower_bound'])}); "
            f"rollouts ratio vs our on-policy: {p['rollouts_ratio_vs_onpolicy']}"
            f"{lb(p['rollouts_ratio_vs_onpolicy_is_lower_bound'])}")


if __name__ == "__main__":
    main()
