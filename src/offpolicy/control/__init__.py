"""Off-policy control: SAC and its relatives on gymnasium environments (optional extra ``offpolicy[control]``).

Isolated from the language-model stack: it imports only the shared conventions (config helpers, metric
sinks). ``ALGOS`` maps a recipe's ``algo`` to its agent class; a miss lists the valid names.
"""

from __future__ import annotations

ALGOS: dict[str, type] = {}


def register(name: str):
    def deco(cls: type) -> type:
        ALGOS[name] = cls
        return cls

    return deco


def _register_all() -> None:
    from offpolicy.control.sac import SAC

    from offpolicy.control.dsac_t import DSACT
    from offpolicy.control.flashsac import FlashSAC
    from offpolicy.control.mdpo_off import MDPOOff
    from offpolicy.control.onpolicy import PPO, PPOPROPS
    from offpolicy.control.ro2o import RO2O
    from offpolicy.control.td3 import TD3
    from offpolicy.control.td3_bc import TD3BC

    register("sac")(SAC)
    register("td3")(TD3)
    register("dsac_t")(DSACT)
    register("mdpo_off")(MDPOOff)
    register("flashsac")(FlashSAC)
    register("td3_bc")(TD3BC)
    register("ro2o")(RO2O)
    register("ppo")(PPO)
    register("ppo_props")(PPOPROPS)


_register_all()
