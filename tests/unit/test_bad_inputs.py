"""The bad input catalogue: every malformed input ends in one short error naming the culprit, before any write.

Each :class:`Case` is a tiny run (``TINY_RUN`` + its overrides) with one thing wrong. The unit test runs
``load_config`` + ``preflight`` on it; ``tests/integration/test_bad_inputs_cli.py`` runs the same list through
``offpolicy train`` (exit code 2, one ``error:`` line, no traceback). ``docs/errors.md`` is generated from
this list and the messages it gets (``python tests/unit/test_bad_inputs.py`` rewrites it; a test checks
it is current), so the document and the behaviour cannot drift apart.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.conftest's TINY_RUN, also when run as a script
from tests.conftest import TINY_RUN  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
BASE = ["rl.steps=1", "sft.steps=0"]  # one RL step of the tiny run: the catalogue checks fail before it


@dataclass
class Case:
    id: str
    what: str  # the malformed input, in words
    overrides: list[str]  # "{tmp}" is the case's scratch folder
    needles: list[str]  # every one must appear in the one-line message
    files: dict[str, str | bytes] = field(default_factory=dict)  # scratch files written before the run
    setup: str | None = None  # a named builder below (checkpoints)
    recipe: str | None = None  # recipe file text (None: defaults + overrides)
    resume: bool = False


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1), "solution": f"{i + 1}"} for i in range(200)]
FILE = ["task.name=file", "task.params={path: {tmp}/data.jsonl}"]
REWARDS = '''
import time
def as_text(prompt, completion, answer): return "one"
def nothing(prompt, completion, answer): return None
def boom(prompt, completion, answer): raise RuntimeError("reward server down")
def nan(prompt, completion, answer): return float("nan")
def slow(prompt, completion, answer): time.sleep(5); return 1.0
not_a_function = 3
'''

CASES = [
    # ---- recipe and override syntax
    Case("recipe_missing", "recipe file does not exist", [], ["nope.yaml", "does not exist"], recipe="(missing)"),
    Case("recipe_not_yaml", "recipe is not valid YAML", [], ["recipe.yaml", "not valid YAML"], recipe="rl: [1, 2\n"),
    Case("recipe_not_mapping", "recipe is a list, not sections", [], ["must be a mapping"], recipe="- rl\n- sft\n"),
    Case("unknown_section", "unknown top-level key", ["trainer.steps=3"], ["trainer", "unknown key"]),
    Case("mistyped_key", "mistyped key", ["rl.optim.lrr=0.1"], ["rl.optim.lrr", "unknown key"]),
    Case("wrong_type", "a word where a number goes", ["rl.steps=lots"], ["rl.steps", "'lots'"]),
    Case("override_no_equals", "override without `=`", ["rl.steps"], ["override 'rl.steps'", "key.sub=value"]),
    Case("override_empty_part", "override with an empty key part", ["rl..steps=1"], ["empty key part"]),
    Case("override_not_section", "override below a scalar", ["rl.steps.x=1"], ["rl.steps is not a section"]),
    Case("override_bad_yaml", "override value is not YAML", ["rl.loss_params={a: [1"], ["rl.loss_params", "YAML"]),
    Case("bad_literal", "value outside a fixed set", ["run.mode=turbo"], ["run.mode", "turbo"]),
    Case("bad_device", "unknown device", ["run.device=gpu0"], ["run.device", "gpu0"]),
    # ---- ranges
    Case("threads_0", "no torch threads", ["run.threads=0"], ["run.threads", "greater than or equal to 1"]),
    Case("eval_n_0", "no evaluation problems", ["eval.n_problems=0"], ["eval.n_problems"]),
    Case("lr_negative", "negative learning rate", ["rl.optim.lr=-1"], ["rl.optim.lr", "greater than 0"]),
    Case("betas_out_of_range", "Adam beta >= 1", ["rl.optim.betas=[0.9, 1.5]"], ["rl.optim.betas.1"]),
    Case("top_p_0", "top_p of 0", ["sampling.top_p=0"], ["sampling.top_p", "greater than 0"]),
    Case("temperature_0", "temperature of 0", ["sampling.temperature=0"], ["sampling.temperature"]),
    Case("reward_timeout_negative", "negative reward timeout", ["task.reward_timeout_s=-1"],
         ["task.reward_timeout_s"]),
    Case("sft_batch_0", "empty SFT batch", ["sft.batch_size=0"], ["sft.batch_size"]),
    Case("prompts_per_step_0", "no prompts per step", ["rl.prompts_per_step=0"], ["rl.prompts_per_step"]),
    Case("buffer_capacity_0", "a buffer that holds nothing", ["rl.buffer.capacity=0"], ["rl.buffer.capacity"]),
    Case("max_staleness_negative", "negative staleness bound", ["rl.buffer.max_staleness=-1"],
         ["rl.buffer.max_staleness"]),
    Case("micro_batch_0", "empty micro-batch", ["rl.micro_batch_size=0"], ["rl.micro_batch_size"]),
    Case("async_workers_0", "no rollout workers", ["async.num_workers=0"], ["async.num_workers"]),
    Case("async_sync_every_0", "weights never broadcast", ["async.sync_every=0"], ["async.sync_every"]),
    Case("keep_checkpoints_0", "keep no checkpoint", ["run.keep_checkpoints=0"], ["run.keep_checkpoints"]),
    Case("stop_at_accuracy_above_1", "unreachable SFT target", ["sft.steps=2", "sft.eval_every=1",
         "sft.stop_at_accuracy=1.5"], ["sft.stop_at_accuracy=1.5"]),
    # ---- keys that contradict each other
    Case("heads_do_not_divide", "width not divisible by heads", ["policy.d_model=30", "policy.n_heads=4"],
         ["policy.d_model=30", "policy.n_heads=4"]),
    Case("group_size_1_grpo", "group size 1 with a group-relative advantage", ["rl.group_size=1"],
         ["rl.group_size=1", "'grpo'"]),
    Case("group_size_1_drop", "group size 1 with uninformative groups dropped",
         ["rl.group_size=1", "rl.advantage=reinforce"], ["rl.group_size=1", "rl.drop_uninformative_groups"]),
    Case("max_new_tokens_beyond_context", "max_new_tokens >= the context", ["sampling.max_new_tokens=40"],
         ["sampling.max_new_tokens=40", "policy.max_len=32"]),
    Case("offline_without_path", "offline mode with no data", ["run.mode=offline"], ["offline.path"]),
    Case("ray_address_sync", "a Ray address in sync mode", ["run.ray_address=auto"], ["run.ray_address"]),
    # ---- losses, advantages, controllers
    Case("unknown_loss", "misspelt loss", ["rl.loss=ppo_clipp"], ["rl.loss", "ppo_clipp"]),
    Case("unknown_advantage", "misspelt advantage", ["rl.advantage=grp"], ["rl.advantage", "grp"]),
    Case("unknown_loss_param", "hyperparameter the loss does not take", ["rl.loss_params={clip: 0.2}"],
         ["rl.loss_params.clip", "clip_high"]),
    Case("clip_reversed", "clip bounds given as absolute, reversed", ["rl.loss_params={clip_low: 1.2, clip_high: 0.8}"],
         ["rl.loss_params.clip_low=1.2", "reversed"]),
    Case("clip_negative", "negative clip bound", ["rl.loss_params={clip_high: -0.1}"],
         ["rl.loss_params.clip_high=-0.1", ">= 0"]),
    Case("bounds_reversed", "absolute bounds low > high (topr)", ["rl.loss=topr", "rl.advantage=reinforce",
         "rl.loss_params={neg_low: 1.0, neg_high: 0.5}"], ["neg_low=1.0 > neg_high=0.5", "reversed"]),
    Case("loss_param_not_number", "a word for a clip bound", ["rl.loss_params={clip_high: wide}"],
         ["rl.loss_params.clip_high='wide'", "number"]),
    Case("unknown_controller", "unknown controller", ["rl.controllers={warp: {}}"], ["rl.controllers.warp"]),
    # ---- tasks and their data files
    Case("unknown_task", "misspelt task", ["task.name=additon"], ["'additon'", "addition"]),
    Case("bad_task_param", "task parameter that does not exist", ["task.params={digits: 3}"], ["'digits'"]),
    Case("file_missing", "task file does not exist", FILE, ["data.jsonl", "not found"]),
    Case("file_empty", "empty task file", FILE, ["data.jsonl", "no rows"], files={"data.jsonl": ""}),
    Case("file_bad_json_row", "malformed jsonl row", FILE, ["data.jsonl:line 2", "bad JSON"],
         files={"data.jsonl": jsonl(ROWS[0], '{"prompt": "1+1=", "answer": 2', *ROWS[1:])}),
    Case("file_not_utf8", "task file that is not UTF-8 text", FILE, ["data.jsonl", "not UTF-8"],
         files={"data.jsonl": b'{"prompt": "\xff", "answer": "1"}\n'}),
    Case("file_row_not_object", "jsonl row that is a list", FILE, ["data.jsonl:line 1", "JSON object"],
         files={"data.jsonl": jsonl([1, 2], *ROWS)}),
    Case("file_missing_answer", "row without the answer field", FILE, ["data.jsonl:line 3", "'answer'"],
         files={"data.jsonl": jsonl(*ROWS[:2], {"prompt": "2+2="}, *ROWS[2:])}),
    Case("file_answer_wrong_type", "answer that is a list", FILE, ["data.jsonl:line 1", "'answer'", "list"],
         files={"data.jsonl": jsonl({"prompt": "1+1=", "answer": [2]}, *ROWS)}),
    Case("file_duplicate_id", "two rows with one id", FILE, ["data.jsonl:line 2", "duplicate id"],
         files={"data.jsonl": jsonl({**ROWS[0], "id": 7}, {**ROWS[1], "id": 7}, *ROWS[2:])}),
    Case("file_wrong_suffix", "a .csv task file", ["task.name=file", "task.params={path: {tmp}/data.csv}"],
         ["data.csv", ".jsonl or .parquet"], files={"data.csv": "prompt,answer\n1+1=,2\n"}),
    Case("parquet_not_parquet", "a .parquet file that is not parquet",
         ["task.name=file", "task.params={path: {tmp}/data.parquet}"], ["data.parquet", "not a readable parquet"],
         files={"data.parquet": "prompt,answer\n"}),
    Case("eval_split_too_small", "more eval problems than the file holds", [*FILE, "eval.n_problems=30"],
         ["eval split", "eval.n_problems=30"], files={"data.jsonl": jsonl(*ROWS)}),
    Case("prompt_longer_than_context", "a prompt longer than the context", FILE,
         ["data.jsonl:line 5", "policy.max_len", "sampling.max_new_tokens=6"],
         files={"data.jsonl": jsonl(*ROWS[:4], {"prompt": "9" * 40 + "+1=", "answer": "1"}, *ROWS[4:])}),
    Case("sft_without_solutions", "SFT on a file without solutions", [*FILE, "sft.steps=2"],
         ["sft.steps", "no expert solution", "data.jsonl:line"],
         files={"data.jsonl": jsonl(*[{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS])}),
    Case("verifier_fails_on_answer", "numeric verifier, non-numeric reference answer",
         ["task.name=file", "task.params={path: {tmp}/data.jsonl, verifier: numeric}"],
         ["verifier", "data.jsonl:line", "not a number"],
         files={"data.jsonl": jsonl(*[{"prompt": r["prompt"], "answer": "none"} for r in ROWS])}),
    # ---- reward functions
    Case("reward_module_missing", "reward module that does not exist", ["task.reward=no_such_mod:score"],
         ["task.reward", "'no_such_mod' not found"]),
    Case("reward_function_missing", "reward function that does not exist", ["task.reward=bad_rewards:scroe"],
         ["task.reward", "no attribute 'scroe'"], files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_not_callable", "reward that is not a function", ["task.reward=bad_rewards:not_a_function"],
         ["task.reward", "not callable"], files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_spec_malformed", "reward without module:function", ["task.reward=score"],
         ["task.reward", "package.module:function"]),
    Case("reward_returns_text", "reward returning a string", ["task.reward=bad_rewards:as_text"],
         ["task.reward='bad_rewards:as_text'", "must be a number, got str"], files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_returns_none", "reward returning None", ["task.reward=bad_rewards:nothing"],
         ["task.reward='bad_rewards:nothing'", "NoneType"], files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_returns_nan", "reward returning NaN", ["task.reward=bad_rewards:nan"],
         ["task.reward='bad_rewards:nan'", "not finite"], files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_raises", "reward raising", ["task.reward=bad_rewards:boom"],
         ["task.reward='bad_rewards:boom'", "RuntimeError", "reward server down"],
         files={"mods/bad_rewards.py": REWARDS}),
    Case("reward_hangs", "reward slower than its timeout", ["task.reward=bad_rewards:slow",
         "task.reward_timeout_s=0.2"], ["task.reward='bad_rewards:slow'", "task.reward_timeout_s=0.2"],
         files={"mods/bad_rewards.py": REWARDS}),
    # ---- checkpoints in policy.init
    Case("init_missing", "checkpoint folder that does not exist", ["policy.init={tmp}/nope"],
         ["nope", "does not exist"]),
    Case("init_not_a_checkpoint", "a folder that is not a checkpoint", ["policy.init={tmp}/empty"],
         ["policy.init", "empty", "no config.json"], setup="empty_dir"),
    Case("init_is_a_file", "a file as checkpoint", ["policy.init={tmp}/weights.bin"], ["weights.bin", "not a file"],
         files={"weights.bin": b"\0\1"}),
    Case("init_config_not_json", "checkpoint config.json that is not JSON", ["policy.init={tmp}/ckpt"],
         ["config.json", "not valid JSON"], files={"ckpt/config.json": "{oops"}),
    Case("init_other_architecture", "checkpoint of another architecture (config says 2 layers, weights hold 1)",
         ["policy.init={tmp}/ckpt"], ["policy.init", "model.safetensors", "does not fit"], setup="other_arch"),
    Case("init_size_keys_differ", "tiny size keys that differ from the checkpoint", ["policy.init={tmp}/ckpt"],
         ["policy.d_model=32", "d_model=48"], setup="tiny_48"),
    Case("init_hf_without_weights", "Hugging Face folder without weights",
         ["policy.init={tmp}/hf"], ["policy.init", "holds no weights"],
         files={"hf/config.json": json.dumps({"model_type": "gpt2"})}),
    Case("init_hf_with_tiny_keys", "tiny size keys with a Hugging Face checkpoint", ["policy.init={tmp}/hf"],
         ["policy.d_model", "Hugging Face"], files={"hf/config.json": json.dumps({"model_type": "gpt2"})}),
    # ---- out_dir, resume, offline data
    Case("out_dir_under_a_file", "out_dir below a regular file", ["run.out_dir={tmp}/afile/run"],
         ["run.out_dir=", "afile is a file"], files={"afile": "x"}),
    Case("out_dir_is_a_file", "out_dir that is a file", ["run.out_dir={tmp}/afile"],
         ["run.out_dir=", "is a file"], files={"afile": "x"}),
    Case("out_dir_holds_a_run", "out_dir of an earlier run, without --resume", ["run.out_dir={tmp}/old"],
         ["run.out_dir=", "already holds a run", "--resume"], files={"old/metrics.jsonl": "{}\n"}),
    Case("resume_nothing", "--resume with no run to resume", ["run.out_dir={tmp}/fresh"],
         ["--resume", "no run to resume"], resume=True),
    Case("offline_path_missing", "offline data that does not exist",
         ["run.mode=offline", "offline.path={tmp}/logs.jsonl"], ["offline.path=", "no such file"]),
    Case("offline_bad_row", "malformed experience row", ["run.mode=offline", "offline.path={tmp}/logs.jsonl"],
         ["logs.jsonl:line 1", "not valid JSON"], files={"logs.jsonl": "{nope\n"}),
    Case("offline_without_behavior_logp", "a loss needing behaviour log-probs on data without them",
         ["run.mode=offline", "offline.path={tmp}/logs.jsonl", "rl.loss=topr", "rl.advantage=reinforce"],
         ["offline.path=", "behavior_logprobs", "rl.loss='topr'"],
         files={"logs.jsonl": jsonl({"prompt_ids": [5, 6], "response_ids": [7, 2], "reward": 1.0})}),
]


# ---- running a case --------------------------------------------------------------------------
def build(case: Case, tmp: Path) -> list[str]:
    """Write the case's files, build its checkpoints; the overrides with ``{tmp}`` filled in."""
    for rel, content in case.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.setup == "empty_dir":
        (tmp / "empty").mkdir()
    elif case.setup in ("other_arch", "tiny_48"):
        from offpolicy.policy.model import build_tiny
        from offpolicy.policy.tiny import TinyConfig

        d = 48 if case.setup == "tiny_48" else 32
        build_tiny(TinyConfig(d_model=d, n_layers=1, n_heads=2, max_len=32)).save(tmp / "ckpt")
        if case.setup == "other_arch":  # the config claims a wider model than the weights hold
            cfg = json.loads((tmp / "ckpt/config.json").read_text())
            (tmp / "ckpt/config.json").write_text(json.dumps({**cfg, "n_layers": 2}))
    base = list(TINY_RUN)
    overrides = [o.replace("{tmp}", str(tmp)) for o in case.overrides]
    keep_sizes = case.setup == "tiny_48" or case.id == "init_hf_with_tiny_keys"  # the cases that are about them
    if any(o.startswith("policy.init=") for o in overrides) and not keep_sizes:  # a checkpoint brings its own shape
        base = [o for o in base if o.split("=")[0] not in ("policy.d_model", "policy.n_layers", "policy.n_heads",
                                                            "policy.max_len")]
    return [*base, f"run.out_dir={tmp / 'run'}", *BASE, *overrides]


def recipe_arg(case: Case, tmp: Path) -> Path | None:
    if case.recipe is None:
        return None
    path = tmp / ("nope.yaml" if case.recipe == "(missing)" else "recipe.yaml")
    if case.recipe != "(missing)":
        path.write_text(case.recipe)
    return path


def error_of(case: Case, tmp: Path) -> BaseException:
    """The exception ``load_config`` + ``preflight`` raise for the case (fails the test if none)."""
    from offpolicy.config import load_config
    from offpolicy.preflight import preflight

    overrides = build(case, tmp)
    sys.path.insert(0, str(tmp / "mods"))
    try:
        cfg = load_config(recipe_arg(case, tmp), overrides)
        preflight(cfg, resume=case.resume)
    except Exception as e:  # noqa: BLE001 -- the test below checks which kind
        return e
    finally:
        sys.path.remove(str(tmp / "mods"))
        sys.modules.pop("bad_rewards", None)
    raise AssertionError(f"{case.id}: no error")


def normalise(msg: str, tmp: Path) -> str:
    return msg.replace(str(tmp), "<tmp>")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_precise_error(case, tmp_path):
    from offpolicy.cli import USER_ERRORS

    err = error_of(case, tmp_path)
    assert isinstance(err, USER_ERRORS), f"{type(err).__name__} would be a traceback: {err}"
    msg = str(err.args[0] if isinstance(err, KeyError) else err)
    assert "\n" not in msg, msg
    assert len(normalise(msg, tmp_path)) < 400, msg
    for needle in case.needles:
        assert needle in msg, (needle, msg)
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks"


def test_catalogue_is_large_and_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_good_run_passes_preflight(tmp_path, tiny_config):
    from offpolicy.preflight import preflight

    preflight(tiny_config(tmp_path / "run", "rl.steps=1", "sft.steps=1"))
    assert not (tmp_path / "run").exists()


def test_every_loss_accepts_its_default_clip_bounds():
    from offpolicy.objectives import POLICY_LOSSES
    from offpolicy.preflight import check_loss_params

    for name in POLICY_LOSSES:
        check_loss_params(name, {})


# ---- docs/errors.md ------------------------------------------------------------------------------
def render(messages: dict[str, str]) -> str:
    head = ("# Errors: the bad input catalogue\n\n"
            "Every malformed input below ends `offpolicy train` with exit code 2 and the one line shown (after\n"
            "`error: `), before anything is written to `run.out_dir`; `--debug` shows the traceback. Each row is a\n"
            "test case of `tests/unit/test_bad_inputs.py` (and, through the CLI, of\n"
            "`tests/integration/test_bad_inputs_cli.py`), run on the tiny test recipe with the overrides shown.\n"
            "This file is generated from that list: `python tests/unit/test_bad_inputs.py` rewrites it.\n\n"
            f"{len(CASES)} cases. `<tmp>` is the case's scratch folder.\n\n"
            "| # | bad input | given | error |\n|---|---|---|---|\n")

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = []
    for i, c in enumerate(CASES, 1):
        given = [f"`{cell(o.replace('{tmp}', '<tmp>'))}`" for o in c.overrides]
        if c.recipe is not None:
            given.insert(0, "a missing recipe" if c.recipe == "(missing)" else f"recipe `{cell(c.recipe.strip())}`")
        if c.resume:
            given.append("`--resume`")
        rows.append(f"| {i} | {cell(c.what)} | {' '.join(given) or '—'} | {cell(messages[c.id])} |")
    return head + "\n".join(rows) + "\n"


def all_messages(root: Path) -> dict[str, str]:
    out = {}
    for c in CASES:
        tmp = root / c.id
        tmp.mkdir()
        err = error_of(c, tmp)
        out[c.id] = normalise(str(err.args[0] if isinstance(err, KeyError) else err), tmp)
    return out


def test_docs_errors_md_is_current(tmp_path):
    assert DOC.read_text() == render(all_messages(tmp_path)), "regenerate: python tests/unit/test_bad_inputs.py"


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    with tempfile.TemporaryDirectory() as d:
        DOC.write_text(render(all_messages(Path(d))))
    print(f"wrote {DOC} ({len(CASES)} cases)")
