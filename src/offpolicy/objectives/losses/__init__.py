"""Policy losses, one module per family, all registered in one ``POLICY_LOSSES`` registry.

=================  ===========================================================================
``common``         the registry, ``ratio_metrics``, PPO's ``clipped_surrogate`` (the contract)
``clipped``        ppo_clip, grpo, dr_grpo, dapo, sapo, cispo
``reinforce``      reinforce, rec, opmd, asymre, mdpo (REINFORCE and regularised REINFORCE)
``sequence``       gspo, gspo_token, gmpo (sequence-level ratios)
``pairwise``       copg, dpo (pairs of responses to one prompt)
``expert``         sft, sft_is, chord (+ ``chord_mu_schedule``), luffy
``adaptive``       bapo, kl_cov, clip_cov, m2po
``stale``          topr, decoupled_ppo, ctpo, minpro, vcpo (asynchronous / stale data)
=================  ===========================================================================

Importing this package registers every loss; every public name stays importable from here.
"""

from offpolicy.objectives.losses.common import (GSPO_LOG_RATIO_MAX, POLICY_LOSSES, clipped_surrogate,
                                                ratio_metrics)
from offpolicy.objectives.losses.clipped import cispo, dapo, dr_grpo, grpo, ppo_clip, sapo
from offpolicy.objectives.losses.reinforce import (REC_CLIP_MODES, REC_REGULARIZERS, REC_WEIGHTS, asymre, mdpo,
                                                   opmd, rec, reinforce)
from offpolicy.objectives.losses.sequence import gmpo, gspo, gspo_token
from offpolicy.objectives.losses.pairwise import copg, dpo
from offpolicy.objectives.losses.expert import chord, chord_mu_schedule, luffy, sft, sft_is
from offpolicy.objectives.losses.adaptive import bapo, clip_cov, kl_cov, m2po
from offpolicy.objectives.losses.stale import ctpo, decoupled_ppo, minpro, remix_ppg, topr, vcpo

__all__ = ["POLICY_LOSSES", "GSPO_LOG_RATIO_MAX", "REC_CLIP_MODES", "REC_REGULARIZERS", "REC_WEIGHTS",
           "clipped_surrogate", "ratio_metrics", "chord_mu_schedule",
           "ppo_clip", "grpo", "dr_grpo", "dapo", "sapo", "cispo", "reinforce", "rec", "opmd", "asymre",
           "gspo", "gspo_token", "gmpo", "sft", "sft_is", "chord", "luffy", "bapo", "kl_cov", "clip_cov", "m2po",
           "topr", "decoupled_ppo", "ctpo", "minpro", "vcpo", "remix_ppg", "copg", "dpo", "mdpo"]
