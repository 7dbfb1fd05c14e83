"""``offpolicy train | eval | ope | algorithms | compare | rollouts | control`` — the command line.

Bad input (a wrong recipe key, a missing file, a malformed dataset row, an
unknown task, an incompatible checkpoint) ends with one clear message and exit
code 2, not a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Off-policy RL post-training of language models.")

# What bad input raises: ValueError covers ConfigError, CheckpointError, pydantic's ValidationError and
# malformed data rows; the OSErrors are files and folders the user named (missing, a file where a folder
# should be, no permission). Anything else (TypeError, IndexError, RuntimeError, ...) is a bug: traceback.
USER_ERRORS = (ValueError, KeyError, ImportError, FileNotFoundError, PermissionError, NotADirectoryError,
               IsADirectoryError, FileExistsError)


def _fail(err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    from pydantic import ValidationError

    from offpolicy.config import describe_validation_error

    if isinstance(err, ValidationError):  # raised outside load_config: same one-line-per-key form
        msg = describe_validation_error(err, None)
    else:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in run.out_dir from its latest checkpoint"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run a recipe: SFT and/or RL stages, evaluation, checkpoints, metrics and a summary."""
    from offpolicy.config import load_config
    from offpolicy.train.runner import train as run_train

    try:
        cfg = load_config(recipe, overrides or [])
        run_train(cfg, resume=resume)  # its setup runs offpolicy.preflight before anything is written
    except USER_ERRORS as e:
        _fail(e, debug)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (or Hugging Face id)"),
    task: str = typer.Option(..., "--task", help="task name, e.g. addition or reasoning_gym:chain_sum"),
    params: Optional[List[str]] = typer.Option(None, "--param", help="task parameter key=value (repeatable)"),
    n: int = typer.Option(500, "--n", min=1, help="held-out problems"),
    samples: int = typer.Option(8, "--samples", "-k", min=0, help="samples per problem for sampled accuracy and pass@k"),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads", min=1),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Held-out accuracy of a checkpoint: greedy, sampled, and pass@k."""
    import torch

    from offpolicy.config import parse_override
    from offpolicy.data.tasks import make_task
    from offpolicy.policy.model import load_policy
    from offpolicy.rollout.engines import make_engine
    from offpolicy.train.evaluate import evaluate

    try:
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (greedy accuracy is always reported), got {temperature}")
        torch.set_num_threads(threads)
        kw = {}
        for text in params or []:
            path, value = parse_override(text)
            kw[".".join(path)] = value
        t = make_task(task, **kw)
        policy = load_policy(checkpoint)
        problems = t.problems(n, split="eval", seed=seed + 10_007)
        result = evaluate(make_engine(policy), policy.tokenizer, problems, t.score, max_new_tokens=max_new_tokens, samples=samples,
                          temperature=temperature, seed=seed)
    except USER_ERRORS as e:
        _fail(e, debug)
    result = {"checkpoint": checkpoint, "task": task, "n": n, "k": samples, **result}
    typer.echo(json.dumps(result, indent=2))


@app.command()
def ope(
    checkpoint: str = typer.Argument(..., help="the target policy: checkpoint folder (or Hugging Face id)"),
    experiences: Path = typer.Option(..., "--experiences", help="logged experiences (.jsonl, e.g. a run's "
                                     "experiences.jsonl written with run.save_experiences=true, or .parquet)"),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="the temperature the target policy would sample at"),
    clip: Optional[float] = typer.Option(None, "--clip", min=0.0, help="cap on importance weights"),
    level: float = typer.Option(0.95, "--level", min=0.0, max=1.0, help="confidence level of the intervals"),
    bootstrap: int = typer.Option(0, "--bootstrap", min=0, help="bootstrap resamples (0 = normal intervals only)"),
    threads: int = typer.Option(2, "--threads", min=1),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Off-policy evaluation: the target policy's expected reward estimated from logged experiences."""
    import torch

    from offpolicy.data.logs import read_log
    from offpolicy.ope import evaluate_offline
    from offpolicy.policy.model import load_policy

    try:
        for flag, value, ok in (("--temperature", temperature, temperature > 0),
                                ("--clip", clip, clip is None or clip > 0), ("--level", level, 0 < level < 1)):
            if not ok:
                raise ValueError(f"{flag} must be {'in (0, 1)' if flag == '--level' else '> 0'}, got {value}")
        torch.set_num_threads(threads)
        if not experiences.is_file():  # before loading a model that may be large
            raise FileNotFoundError(f"experience file not found: {experiences}")
        policy = load_policy(checkpoint)
        logs = read_log(experiences, vocab_size=policy.tokenizer.vocab_size)  # checked row by row against the model
        result = evaluate_offline(policy, logs, temperature=temperature, clip=clip, level=level, bootstrap=bootstrap)
    except USER_ERRORS as e:
        _fail(e, debug)
    result["estimates"] = {k: v.to_dict() for k, v in result["estimates"].items()}
    typer.echo(json.dumps({"checkpoint": checkpoint, "experiences": str(experiences), **result}, indent=2,
                          default=str))


@app.command()
def algorithms() -> None:
    """List every registered objective with its one-line description and paper."""
    from rich.console import Console
    from rich.table import Table

    from offpolicy.objectives import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES

    console = Console()
    for title, reg in (("policy losses", POLICY_LOSSES), ("advantages", ADVANTAGES), ("corrections", CORRECTIONS),
                       ("aggregations", AGGREGATIONS), ("KL estimators", KL_ESTIMATORS)):
        table = Table(title=title, title_justify="left")
        for col in ("name", "needs", "paper", "summary"):
            table.add_column(col)
        for name, fn in sorted(reg.items()):
            doc = (fn.__doc__ or "").strip().splitlines()
            table.add_row(name, ", ".join(getattr(fn, "needs", ())), getattr(fn, "paper", ""),
                          getattr(fn, "summary", doc[0] if doc else ""))
        console.print(table)


@app.command()
def compare(
    args: List[str] = typer.Argument(..., help="RECIPE.yaml ... then key.sub=value overrides applied to every run"),
    seeds: int = typer.Option(3, "--seeds", help="seeds per recipe (run.seed = 0..N-1)"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="key.sub=v1,v2,...: one recipe, one curve per value"),
    target: Optional[str] = typer.Option(None, "--target", help="greedy accuracy to reach (0.5), or a gain over "
                                         "the mean RL-start accuracy (+0.2)"),
    out: Path = typer.Option(..., "--out", help="folder for runs (OUT/<label>/seed<k>), compare.json and plots"),
    suite: Optional[str] = typer.Option(None, "--suite", help="run the recipes on the benchmark suite: 'all' or "
                                        "task names (chain_sum,gcd); writes OUT/suite.json, suite.md, plots"),
    trl: bool = typer.Option(False, "--trl", help="with --suite: TRL's GRPOTrainer as a system (needs offpolicy[bench])"),
    rollouts: int = typer.Option(20480, "--rollouts", min=1, help="with --suite: RL rollouts per run"),
    eval_every: int = typer.Option(2, "--eval-every", min=1, help="with --suite: RL steps between evaluations"),
    eval_problems: int = typer.Option(300, "--eval-problems", min=1, help="with --suite: held-out problems"),
    starts: Path = typer.Option(Path("benchmarks/results/suite_starts.json"), "--starts",
                                help="with --suite: the start checkpoints benchmarks/suite_starts.py made"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run recipes (or a sweep of one key) over seeds, resumably; write compare.json and plots."""
    from rich.console import Console
    from rich.table import Table

    from offpolicy.compare import compare as run_compare
    from offpolicy.compare import split_args

    if suite is not None:
        return _compare_suite(args, suite, trl=trl, seeds=seeds, out=out, rollouts=rollouts, eval_every=eval_every,
                              eval_problems=eval_problems, starts=starts, debug=debug)
    try:
        recipes, overrides = split_args(args)
        result = run_compare(recipes, overrides, seeds=seeds, out=out, sweep=sweep, target=target,
                             say=lambda msg: typer.echo(msg, err=True))
    except USER_ERRORS as e:
        _fail(e, debug)
    def fmt(st: dict, f: str = "{:.3f}") -> str:  # "mean ± half-width of the 95% CI" over seeds
        if st["mean"] is None:
            return "—"
        ci = st.get("ci95")
        return f.format(st["mean"]) + ("" if ci is None else f" ± {f.format((ci[1] - ci[0]) / 2)}")

    table = Table(title=f"compare: {seeds} seed(s), mean ± 95% CI of the mean (Student t)", title_justify="left")
    for col in ("label", "start greedy", "final greedy", "rollouts", "RL seconds", "to target: rollouts",
                "to target: s"):
        table.add_column(col)
    for label, e in result["labels"].items():
        t = e.get("to_target")
        reach = ["—", "—"] if t is None else [f"{fmt(t[k], f)} ({t['reached']}/{t['of']})"
                                              for k, f in (("rollouts", "{:,.0f}"), ("rl_seconds", "{:.0f}"))]
        table.add_row(label, fmt(e["start_greedy_acc"]), fmt(e["final_greedy_acc"]), fmt(e["rollouts"], "{:,.0f}"),
                      fmt(e["rl_seconds"], "{:.0f}"), *reach)
    Console().print(table)
    c = result["counts"]
    typer.echo(f"{c['ran']} run(s) ran, {c['resumed']} resumed, {c['skipped']} skipped; wrote {out / 'compare.json'}")


def _compare_suite(args: list[str], suite: str, *, trl: bool, seeds: int, out: Path, rollouts: int, eval_every: int,
                   eval_problems: int, starts: Path, debug: bool) -> None:
    """``compare --suite``: every recipe (and TRL) on every suite task; the table goes to stdout."""
    from offpolicy.compare import split_args
    from offpolicy.config import ConfigError
    from offpolicy.suite_compare import compare_suite, suite_runs, trl_runner

    try:
        recipes, overrides = split_args(args)
        if not recipes:
            raise ConfigError("compare --suite needs at least one recipe (e.g. recipes/default.yaml)")
        names = None if suite == "all" else [n.strip() for n in suite.split(",") if n.strip()]
        tasks = suite_runs(names, starts)
        threads = [o.split("=", 1)[1] for o in overrides if o.startswith("run.threads=")]  # TRL gets ours
        external = {"trl": trl_runner(eval_problems, eval_every, threads=int(threads[-1]) if threads else 2)} \
            if trl else None
        budgets = sorted({max(1, rollouts // 4), max(1, rollouts // 2), rollouts})
        result = compare_suite(recipes, tasks, seeds=seeds, out=out, budget=rollouts, budgets=budgets,
                               eval_every=eval_every, n_eval=eval_problems, overrides=overrides, external=external,
                               say=lambda msg: typer.echo(msg, err=True))
    except USER_ERRORS as e:
        _fail(e, debug)
    typer.echo((out / "suite.md").read_text())
    typer.echo(json.dumps(result["summary"], indent=2))


rollouts = typer.Typer(no_args_is_help=True, help="Move and look at experience logs (.jsonl or .parquet; "
                       "schema in docs/experiences.md).")
app.add_typer(rollouts, name="rollouts")


def _control_app() -> typer.Typer:
    """``offpolicy control ...``: classic off-policy control (SAC, TD3, DSAC-T, ...); gymnasium loads lazily."""
    from offpolicy.control.cli import app as control_app

    return control_app


app.add_typer(_control_app(), name="control", help="Off-policy control on gymnasium environments "
              "(extra: control): train | eval | collect.")


def _log_path(src: Path) -> Path:
    """A run folder stands for its experiences.jsonl (what run.save_experiences writes)."""
    return src / "experiences.jsonl" if src.is_dir() else src


def _write_new(out: Path, exps: list, force: bool) -> None:
    from offpolicy.data.logs import write_log

    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    write_log(out, exps)
    typer.echo(f"wrote {len(exps)} experiences to {out}")


@rollouts.command("export")
def rollouts_export(
    src: Path = typer.Argument(..., help="a run folder (its experiences.jsonl) or a log file"),
    out: Path = typer.Option(..., "--out", help="FILE.jsonl or FILE.parquet"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Copy a run's experience log to a file, checked, as jsonl or parquet."""
    from offpolicy.data.logs import read_log

    try:
        _write_new(out, read_log(_log_path(src)), force)
    except USER_ERRORS as e:
        _fail(e, debug)


@rollouts.command("import")
def rollouts_import(
    src: Path = typer.Argument(..., help="a foreign log (.jsonl or .parquet) in the schema of docs/experiences.md"),
    out: Path = typer.Option(..., "--out", help="FILE.jsonl or FILE.parquet"),
    source: str = typer.Option("offline", "--source", help="source of rows that lack one "
                               "(policy | expert | offline | guided)"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="token ids must lie in [0, N)"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check a log from elsewhere row by row and write it in offpolicy's schema."""
    from offpolicy.data.logs import read_log
    from offpolicy.experience import SOURCES

    try:
        if source not in SOURCES:
            raise ValueError(f"--source must be one of {list(SOURCES)}, got {source!r}")
        _write_new(out, read_log(src, vocab_size=vocab_size, defaults={"source": source}), force)
    except USER_ERRORS as e:
        _fail(e, debug)


@rollouts.command("inspect")
def rollouts_inspect(
    src: Path = typer.Argument(..., help="a run folder (its experiences.jsonl) or a log file"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="token ids must lie in [0, N)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """What a log holds: rows, groups, sources, behaviour log-probs, versions, rewards, lengths, engines."""
    from offpolicy.data.logs import read_log, summarize

    try:
        path = _log_path(src)
        s = summarize(read_log(path, vocab_size=vocab_size))
    except USER_ERRORS as e:
        _fail(e, debug)
    if as_json:
        typer.echo(json.dumps({"path": str(path), **s}, indent=2))
        return
    _print_summary(path, s)


def _print_summary(path: Path, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def st(d: dict, f: str = "{:.3g}") -> str:
        return "—" if d["mean"] is None else (f"{f.format(d['mean'])} ± {f.format(d['std'])} "
                                              f"[{f.format(d['min'])}, {f.format(d['max'])}]")

    def counts(d: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "—"

    v = s["policy_version"]
    table = Table(title=f"{path}", title_justify="left", show_header=False)
    for key, value in (
        ("rows", str(s["rows"])),
        ("groups", f"{s['groups']} (size {st(s['group_size'])}; {s['rows_without_group_id']} rows without group_id)"),
        ("sources", counts(s["sources"])),
        ("behaviour log-probs", f"{s['with_behavior_logprobs']:.1%} of rows"),
        ("behaviour train log-probs", f"{s['with_behavior_train_logprobs']:.1%} of rows"),
        ("policy versions", f"{v['min']}..{v['max']} ({s['per_token_versions']} rows per token); "
                            f"rows by oldest version: {counts(v['histogram'])}"),
        ("reward (mean ± std [min, max])", st(s["reward"])),
        ("response length", st(s["response_length"])),
        ("prompt length", st(s["prompt_length"])),
        ("engines", counts(s["engines"])),
        ("dtypes", counts(s["dtypes"])),
        ("sampling", counts(s["sampling"])),
    ):
        table.add_row(key, value)
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
