"""Update rules: hand-designed and learned, one interface (see :mod:`metaopt.rules.base`)."""
from metaopt.rules.base import RULES, Rule, make_rule, register_rule
from metaopt.rules.sgd import SGD
from metaopt.rules.adam import Adam
from metaopt.rules.layerwise import LayerwiseLR, PerParameterLR
from metaopt.rules.mlp import MLPRule
from metaopt.rules.lookahead import LookaheadRule
from metaopt.rules.hypergradient import AdamHDRule, SGDHDRule
from metaopt.rules.pertensor import PerTensorRule
from metaopt.rules.anchored import AnchoredRule

__all__ = ["RULES", "Rule", "make_rule", "register_rule", "SGD", "Adam", "LayerwiseLR",
           "PerParameterLR", "MLPRule", "LookaheadRule", "SGDHDRule", "AdamHDRule", "PerTensorRule",
           "AnchoredRule"]
