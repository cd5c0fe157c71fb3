"""Each token-level method name trains the divergence its name promises.

The wiring tests compare a trainer's first step with an independent reference *read from the resolved
recipe*, so a recipe file that maps a name to the wrong divergence (``rkl: {divergence: fkl}``) would pass
them. This table is written from the names' definitions (METHODS.md, the DistiLLM, GKD and AKL papers),
not from ``trainers/``: the resolved recipe's divergence, with its parameters merged over the loss
function's own defaults, must equal it.
"""
import inspect

import pytest

import kdbench.losses as losses
from kdbench.train.recipes import resolve_recipe

# method name -> (divergence, the parameters the name promises)
PROMISED = {
    "kd": ("fkl", {}),
    "rkl": ("rkl", {}),
    "fkl_rkl": ("fkl_rkl", {}),
    "jsd": ("jsd", {"beta": 0.5}),        # generalized JSD at beta 0.5 (GKD)
    "tvd": ("tvd", {}),
    "skl": ("skl", {"alpha": 0.1}),       # KL(p || 0.1 p + 0.9 q), DistiLLM
    "srkl": ("srkl", {"alpha": 0.1}),     # KL(q || 0.9 p + 0.1 q), DistiLLM
    "akl": ("akl", {"mu": 0.5}),          # AKL paper, mu = 0.5
    "akl_r": ("akl_r", {"mu": 0.5}),
    "gkd": ("jsd", {"beta": 0.5}),        # GKD's on-policy generalized JSD
}


def effective_divergence(method: str) -> tuple[str, dict]:
    params = resolve_recipe(method, {}).params
    name = params["divergence"]
    defaults = {k: p.default for k, p in inspect.signature(getattr(losses, name)).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
    return name, {**defaults, **(params.get("divergence_params") or {})}


@pytest.mark.parametrize("method", sorted(PROMISED))
def test_method_name_trains_the_divergence_it_promises(method):
    promised_name, promised_params = PROMISED[method]
    name, params = effective_divergence(method)
    assert name == promised_name, f"{method} trains {name}, its name promises {promised_name}"
    for key, value in promised_params.items():
        assert params.get(key) == value, f"{method}: {key} = {params.get(key)}, its name promises {value}"
