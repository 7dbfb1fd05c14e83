"""Experience validation and the Batch layout: left-padded prompts, right-padded responses."""

from __future__ import annotations

import pytest
import torch

from offpolicy.experience import Experience, collate

PAD = 0


def test_defaults_fill_the_response_mask():
    e = Experience(prompt_ids=[5, 6], response_ids=[7, 8, 9])
    assert e.response_mask == [1, 1, 1]
    assert e.behavior_logprobs is None
    assert e.source == "policy"


@pytest.mark.parametrize("field", ["response_mask", "behavior_logprobs", "token_rewards", "turn_ids", "policy_version"])
def test_per_token_fields_must_match_the_response_length(field):
    with pytest.raises(ValueError, match=field):
        Experience(prompt_ids=[1], response_ids=[7, 8, 9], **{field: [1, 1]})


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="source"):
        Experience(prompt_ids=[1], response_ids=[2], source="teacher")  # type: ignore[arg-type]


def test_min_version_of_scalar_and_per_token_versions():
    assert Experience([1], [2, 3], policy_version=4).min_version == 4
    assert Experience([1], [2, 3], policy_version=[5, 3]).min_version == 3
    assert Experience([1], [], policy_version=[]).min_version == 0


def test_dict_round_trip():
    e = Experience([1, 2], [3, 4], reward=0.5, behavior_logprobs=[-0.1, -0.2], policy_version=[1, 2],
                   source="guided", group_id="g", task_id="t", info={"truncated": True})
    assert Experience.from_dict(e.to_dict()) == e


def _batch():
    return [
        Experience([11, 12, 13], [21, 22], reward=1.0, behavior_logprobs=[-0.5, -0.25], policy_version=3, group_id="a"),
        Experience([14], [23, 24, 25], reward=0.0, behavior_logprobs=[-1.0, -2.0, -3.0], policy_version=[1, 2, 2],
                   response_mask=[1, 0, 1], group_id="b"),
        Experience([15, 16], [26], reward=0.5, behavior_logprobs=[-0.125], group_id="a"),
    ]


def test_collate_layout():
    b = collate(_batch(), pad_id=PAD)
    P, T = 3, 3
    assert b.prompt_len == P and b.size == 3
    assert b.input_ids.shape == (3, P + T) and b.response_ids.shape == (3, T)
    # prompts are left-padded so every response starts at column P; responses are right-padded
    assert b.input_ids.tolist() == [
        [11, 12, 13, 21, 22, PAD],
        [PAD, PAD, 14, 23, 24, 25],
        [PAD, 15, 16, 26, PAD, PAD],
    ]
    assert b.attention_mask.tolist() == [
        [True, True, True, True, True, False],
        [False, False, True, True, True, True],
        [False, True, True, True, False, False],
    ]
    assert torch.equal(b.response_ids, b.input_ids[:, P:])
    assert b.mask.tolist() == [[1, 1, 0], [1, 0, 1], [1, 0, 0]]
    assert b.versions.tolist() == [[3, 3, 0], [1, 2, 2], [0, 0, 0]]
    assert b.behavior_logp.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0]]
    assert b.has_behavior.tolist() == [True, True, True]
    assert b.rewards.tolist() == [1.0, 0.0, 0.5]
    assert b.is_expert.tolist() == [False, False, False]


def test_group_index_numbers_groups_in_order_of_appearance():
    exps = _batch() + [Experience([1], [2], group_id="c"), Experience([1], [2]), Experience([1], [2])]
    # rows without a group id are each their own group
    assert collate(exps, PAD).group_index.tolist() == [0, 1, 0, 2, 3, 4]


def test_one_row_without_behaviour_logprobs_keeps_the_others():
    """An expert row must not erase the batch's behaviour log-probs: they stay, 0 on that row, and
    has_behavior says which rows hold them (None only when no row has any)."""
    exps = _batch() + [Experience([1], [2, 3], source="expert")]
    b = collate(exps, PAD)
    assert b.behavior_logp is not None and b.behavior_logp[3].abs().sum() == 0
    assert b.has_behavior.tolist() == [True, True, True, False]
    assert collate([Experience([1], [2], source="expert")], PAD).behavior_logp is None
    assert b.is_expert.tolist() == [False, False, False, True]


def test_offline_rows_count_as_expert_and_guided_rows_do_not():
    b = collate([Experience([1], [2], source="offline"), Experience([1], [2], source="guided",
                                                                    behavior_logprobs=[-1.0])], PAD)
    assert b.is_expert.tolist() == [True, False]


def test_empty_responses_keep_one_response_column():
    b = collate([Experience([1, 2], [])], PAD)
    assert b.input_ids.shape == (1, 3) and b.mask.tolist() == [[0.0]]


def test_collate_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        collate([], PAD)


def test_batch_to_keeps_every_field():
    b = collate(_batch(), PAD)
    moved = b.to("cpu")
    assert moved.prompt_len == b.prompt_len and torch.equal(moved.input_ids, b.input_ids)
