"""Compact prompt formats for reasoning-gym datasets (``prompt_format: compact``): no instruction text.

A tiny character-level model pays for every prompt character (chain_sum's English question is
69 characters and made SFT ~25x slower per step than ``"12+34="``), so each supported dataset
gets one small formatter that builds a short, unambiguous prompt from the entry's *metadata*
(never by parsing the English question), the expert answer in the same compact form, and the
inverse map from a compact completion to the answer string the dataset's own ``score_answer``
expects. Rewards therefore still come from reasoning-gym's scorer, given the entry.

===================  ======================  ==================
dataset              prompt                  answer
===================  ======================  ==================
basic_arithmetic     ``12*3-4=``             ``32``
chain_sum            ``12+34-5=``            ``41``
count_bits           ``bits 1101=``          ``3`` (the number is shown in binary: a counting task)
spell_backward       ``rev hello=``          ``olleh``
number_sorting       ``asc 5 3 9=``          ``3 5 9`` (``desc`` for descending)
gcd                  ``gcd 12 18=``          ``6``
lcm                  ``lcm 4 6=``            ``12``
letter_counting      ``count e the tree=``   ``3``
base_conversion      ``122 b3>b6=``          ``25``
leg_counting         ``legs 2 cat 1 bird=``  ``10``
===================  ======================  ==================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from offpolicy.objectives.registry import Registry


@dataclass(frozen=True)
class CompactFormat:
    """How one dataset is written compactly."""

    prompt: Callable[[dict], str]  # entry -> prompt (ends with "=")
    answer: Callable[[dict], str]  # entry -> the expert answer in compact form
    to_scorer: Callable[[str], str] = lambda text: text  # compact answer -> what score_answer expects


COMPACT_FORMATS = Registry("compact prompt format")


def _register(name: str, fmt: CompactFormat) -> None:
    if name in COMPACT_FORMATS:
        raise ValueError(f"compact prompt format {name!r} is registered twice")
    COMPACT_FORMATS[name] = fmt


def compact_format(dataset: str) -> CompactFormat:
    """The compact format of ``dataset``; ``KeyError`` naming the dataset and the supported ones if none."""
    if dataset not in COMPACT_FORMATS:
        raise KeyError(
            f"reasoning-gym dataset {dataset!r} has no compact prompt format; prompt_format: compact supports "
            f"{', '.join(sorted(COMPACT_FORMATS))} (use prompt_format: question for the others)"
        )
    return COMPACT_FORMATS[dataset]


def _meta(entry: dict) -> dict:
    return entry["metadata"]


def _stored(entry: dict) -> str:
    return str(entry["answer"])


def _expression(entry: dict) -> str:
    """``"12 + 34 - 5"`` -> ``"12+34-5="`` (the metadata's expression with its spaces removed)."""
    return "".join(_meta(entry)["expression"].split()) + "="


def _number(text: str) -> str:
    """``"14.0"`` -> ``"14"``, ``"-2.50"`` -> ``"-2.50"``: integral floats lose their ``.0`` (scored as floats)."""
    value = float(text)
    return str(int(value)) if value.is_integer() else text


def _sorting_prompt(entry: dict) -> str:
    meta = _meta(entry)
    direction = {"ascending": "asc", "descending": "desc"}[meta["direction"]]
    return f"{direction} {' '.join(_number(x) for x in meta['original_numbers'])}="


def _sorting_answer(entry: dict) -> str:
    return " ".join(_number(x) for x in _meta(entry)["sorted_numbers"])


def _sorting_to_scorer(text: str) -> str:
    """``"3 5 9"`` -> ``'["3", "5", "9"]'`` (number_sorting's scorer reads a JSON list)."""
    return json.dumps(text.split())


def _legs_prompt(entry: dict) -> str:
    animals = _meta(entry)["animals"]
    return "legs " + " ".join(f"{count} {animal}" for animal, count in animals.items()) + "="


def _letters_prompt(entry: dict) -> str:
    meta = _meta(entry)
    return f"count {meta['target_letter']} {' '.join(meta['span'])}="


def _base_prompt(entry: dict) -> str:
    meta = _meta(entry)
    return f"{meta['source_repr']} b{meta['source_base']}>b{meta['target_base']}="


_register("basic_arithmetic", CompactFormat(_expression, _stored))
_register("chain_sum", CompactFormat(_expression, _stored))
_register("count_bits", CompactFormat(lambda e: f"bits {_meta(e)['binary']}=", _stored))
_register("spell_backward", CompactFormat(lambda e: f"rev {_meta(e)['word']}=", _stored))
_register("number_sorting", CompactFormat(_sorting_prompt, _sorting_answer, _sorting_to_scorer))
_register("gcd", CompactFormat(lambda e: "gcd " + " ".join(map(str, _meta(e)["numbers"])) + "=", _stored))
_register("lcm", CompactFormat(lambda e: "lcm " + " ".join(map(str, _meta(e)["numbers"])) + "=", _stored))
_register("letter_counting", CompactFormat(_letters_prompt, _stored))
_register("base_conversion", CompactFormat(_base_prompt, _stored))
_register("leg_counting", CompactFormat(_legs_prompt, _stored))
