"""Structured configs (dataclasses in Hydra's ConfigStore) for the groups task/, rule/, scheme/,
meta/ and eval/. Typed fields mean a malformed value fails at composition with the key named;
``build_*`` turn a composed config into objects and raise one-line errors naming the key."""
from __future__ import annotations

import collections.abc
import inspect
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from metaopt.meta import ES, PES, Continuous, Interleaved, Nested
from metaopt.meta.trainer import DTYPES, TrainConfig
from metaopt.rules import (SGD, Adam, AdamHDRule, AnchoredRule, LayerwiseLR, LookaheadRule,
                           MLPRule, PerParameterLR, PerTensorRule, SGDHDRule)


# -- task/ ------------------------------------------------------------------------------------
@dataclass
class TaskConf:
    family: str = MISSING


@dataclass
class DigitsMLPConf(TaskConf):
    family: str = "digits_mlp"
    widths: List[int] = field(default_factory=lambda: [32, 64])
    depths: List[int] = field(default_factory=lambda: [1, 2])
    activations: List[str] = field(default_factory=lambda: ["relu", "tanh", "gelu"])
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    split_seed: int = 0


@dataclass
class DigitsConvConf(TaskConf):
    family: str = "digits_conv"
    channels: List[int] = field(default_factory=lambda: [8, 12, 16])
    depths: List[int] = field(default_factory=lambda: [1, 2])
    activations: List[str] = field(default_factory=lambda: ["relu", "tanh", "gelu"])
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    split_seed: int = 0


@dataclass
class LogRegConf(TaskConf):
    family: str = "logreg_cancer"
    dataset: str = "breast_cancer"
    batch_size: int = 32
    split_seed: int = 0
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    l2: float = 0.0


@dataclass
class QuadraticConf(TaskConf):
    family: str = "quadratic"
    dim: int = 10
    cond: List[float] = field(default_factory=lambda: [1.0, 100.0])
    noise: List[float] = field(default_factory=lambda: [0.0, 0.5])
    batch_size: int = 1
    init_scale: float = 1.0


@dataclass
class CharLMConf(TaskConf):
    family: str = "char_lm"
    seq_len: int = 32
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 2
    batch_size: int = 16
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    mlp_ratio: int = 4


@dataclass
class DigitsAEConf(TaskConf):
    family: str = "digits_ae"
    widths: List[int] = field(default_factory=lambda: [32, 64])
    bottlenecks: List[int] = field(default_factory=lambda: [4, 8, 16])
    activations: List[str] = field(default_factory=lambda: ["relu", "tanh"])
    losses: List[str] = field(default_factory=lambda: ["mse"])
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    split_seed: int = 0


@dataclass
class AssocRetrievalConf(TaskConf):
    family: str = "assoc_retrieval"   # Ba et al.'s associative retrieval, learned by a tanh RNN
    num_pairs: int = 4
    hidden: List[int] = field(default_factory=lambda: [20])
    embed: int = 16
    batch_sizes: List[int] = field(default_factory=lambda: [128])
    init_scale: List[float] = field(default_factory=lambda: [0.5, 2.0])
    num_examples: int = 130000
    split_seed: int = 0


@dataclass
class SuiteConf(TaskConf):
    family: str = "suite"
    problem: str = "wine_mlp"


def _default_mixture():
    # the meta-training mixture of the shipped default rule (see README "learned optimizer")
    return {
        "digits_mlp": {"weight": 4.0, "widths": [16, 32, 64, 128], "depths": [1, 2, 3],
                       "activations": ["relu", "tanh", "gelu"], "init_scale": [0.5, 2.0],
                       "batch_sizes": [32, 64, 128], "norms": ["none", "layer"]},
        "digits_conv": {"weight": 1.0, "channels": [8, 16], "depths": [1, 2],
                        "activations": ["relu", "gelu"], "batch_sizes": [64]},
        "digits_ae": {"weight": 1.5},
        "logreg_cancer": {"weight": 1.0, "batch_size": 32},
        "quadratic": {"weight": 0.5, "dim": 10, "cond": [1.0, 100.0], "noise": [0.0, 0.5],
                      "batch_size": 1},
        "char_lm": {"weight": 0.5, "seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2,
                    "batch_size": 8},
    }


@dataclass
class MixtureConf(TaskConf):
    family: str = "mixture"
    members: Dict[str, Any] = field(default_factory=_default_mixture)
    reparam_prob: float = 0.5          # Celo-style augmentation: per-tensor scale reparam
    reparam_range: List[float] = field(default_factory=lambda: [0.1, 10.0])


# -- rule/ and scheme/: generated from the constructors (hydra-zen's ``builds``) -----------------
@dataclass
class RuleConf:
    name: str = MISSING


@dataclass
class SchemeConf:
    name: str = MISSING


def _field_type(hint):
    """The OmegaConf-typed form of a constructor annotation: sequences become lists, anything
    OmegaConf cannot type (a Rule instance, a mapping) the string or Any a config can hold."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, bool, str):
        return hint
    if origin in (collections.abc.Sequence, list, tuple, List, Tuple) and args:
        return List[args[0]]
    if origin is Union and type(None) in args and len(args) == 2:
        return Optional[_field_type(next(a for a in args if a is not type(None)))]
    if origin is Union and str in args:
        return str      # e.g. lookahead's inner: a rule name in a config
    return Any


def builds(cls, name: str, base=RuleConf, exclude: Sequence[str] = (), **overrides):
    """A structured config node for ``cls``: one field per constructor argument (minus
    ``exclude``) with the constructor's default (or ``overrides``, each a deliberate recipe
    choice) and ``name`` set, so the defaults have one source."""
    hints = typing.get_type_hints(cls.__init__)
    specs = [("name", str, field(default=name))]
    for arg, p in inspect.signature(cls.__init__).parameters.items():
        if arg == "self" or arg in exclude or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = overrides.get(arg, p.default)
        if isinstance(default, tuple):
            default = list(default)
        f = field(default_factory=lambda d=default: list(d)) if isinstance(default, list) \
            else field(default=default)
        specs.append((arg, _field_type(hints.get(arg, Any)), f))
    conf_name = f"{cls.__name__}Conf"
    return make_dataclass(conf_name, specs, bases=(base,), namespace={"__module__": __name__})


SGDRuleConf = builds(SGD, "sgd")
AdamRuleConf = builds(Adam, "adam")
LayerwiseConf = builds(LayerwiseLR, "layerwise_lr", exclude=("beta1", "beta2", "eps"))
PerParamConf = builds(PerParameterLR, "per_param_lr")
# the CLI's mlp rule is activation- and loss-aware (the Python constructor keeps the plain rule,
# which needs no model hooks in LearnedOptimizer)
MLPRuleConf = builds(MLPRule, "mlp", exclude=("step_mult", "exp_mult"), act_features=True,
                     loss_features=True)
PerTensorRuleConf = builds(PerTensorRule, "pertensor")
AnchoredRuleConf = builds(AnchoredRule, "anchored")
LookaheadRuleConf = builds(LookaheadRule, "lookahead")
SGDHDRuleConf = builds(SGDHDRule, "sgd_hd")
AdamHDRuleConf = builds(AdamHDRule, "adam_hd")

NestedConf = builds(Nested, "nested", base=SchemeConf)
# interleaved.mode: auto | forward (exact sensitivities) | one_step; auto takes forward mode up
# to max_forward_params meta-parameters
InterleavedConf = builds(Interleaved, "interleaved", base=SchemeConf)
# continuous: euler (default) integrates the rule exactly as its discrete update; rk4/dopri5
# follow the continuous flow more closely but diverged (NaN) on the MLP rule, whose
# moment-normalized inputs make the field stiff in the first steps -- use them with
# sgd/adam/layerwise_lr rules. gradient: adjoint | backprop; eta: time of one inner step;
# substeps: fixed-grid solver steps per inner step; store_every: adjoint + valid_last keeps the
# solution every n steps
ContinuousConf = builds(Continuous, "continuous", base=SchemeConf)
# es: num_samples antithetic pairs per slot; theta_run also runs theta itself (exact logged
# loss; false: the particles' mean is the slot's run, 2N runs not 2N+1); compile: torch.compile
# the single-task inner step (no steady gain over the eager vmapped runs: benchmarks/bench_peers.py)
ESConf = builds(ES, "es", base=SchemeConf)
PESConf = builds(PES, "pes", base=SchemeConf)


# -- local/ -----------------------------------------------------------------------------------
@dataclass
class LocalConf:
    """Local per-layer losses (metaopt.tasks.local, metaopt.meta.local); ``none`` = off."""
    inner: str = "global"            # global | local | mixed: the inner training loss
    meta: str = "global"             # global | local | mixed: the meta-gradient
    layers: Optional[List[int]] = None   # hidden units that get a head (null = all but the last)
    kind: str = "linear"             # linear (to the targets) | recon (reconstruct the block input)
    weights: List[float] = field(default_factory=lambda: [1.0])  # one per head, or one for all
    mix: float = 0.5                 # meta=mixed: (1 - mix) * global + mix * local


# -- eval/ ------------------------------------------------------------------------------------
@dataclass
class EvalConf:
    steps: int = 500
    num_tasks: int = 4
    seed: int = 1_000_000_000      # held-out task seeds: seed, seed+1, ... (never drawn in training)
    eval_every: int = 25
    extra_families: List[str] = field(default_factory=lambda: ["digits_conv"])
    sgd_lrs: List[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    adam_lrs: List[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    baselines: List[str] = field(default_factory=lambda: ["sgd", "adam"])
    reference_adam_lr: float = 1e-3
    dtype: str = "float32"


def _default_peers():
    from metaopt.meta.peers import DEFAULT_PEERS
    return list(DEFAULT_PEERS)


@dataclass
class SpeedupConf:
    """``metaopt-eval --config-name=suite``: speedup over lr-tuned Adam on the held-out suite."""
    steps: int = 1000                  # S: the optimizer's step budget
    k: int = 4                         # Adam runs k * S steps (the envelope's horizon)
    adam_lrs: List[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    set: str = "design"                # design: the half decisions are made on; final: the report's
    problems: Optional[List[str]] = None   # problems of `set` to run; null = all of them
    seeds: List[int] = field(default_factory=lambda: [0])
    eval_every: int = 10
    eval_examples: int = 1024
    cache_dir: Optional[str] = "runs/adam_cache"   # Adam reference runs (JSON); null = no cache
    # untuned optimizers at their documented defaults (metaopt/meta/peers.py), run on the same
    # problems and seeds; [] = none
    peers: List[str] = field(default_factory=_default_peers)


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in [("digits_mlp", DigitsMLPConf), ("digits_conv", DigitsConvConf),
                       ("logreg_cancer", LogRegConf), ("quadratic", QuadraticConf),
                       ("char_lm", CharLMConf), ("digits_ae", DigitsAEConf),
                       ("suite", SuiteConf), ("mixture", MixtureConf),
                       ("assoc_retrieval", AssocRetrievalConf)]:
        cs.store(group="task", name=name, node=node)
    for name, node in [("sgd", SGDRuleConf), ("adam", AdamRuleConf), ("layerwise_lr", LayerwiseConf),
                       ("per_param_lr", PerParamConf), ("mlp", MLPRuleConf),
                       ("lookahead", LookaheadRuleConf), ("sgd_hd", SGDHDRuleConf),
                       ("adam_hd", AdamHDRuleConf), ("pertensor", PerTensorRuleConf),
                       ("anchored", AnchoredRuleConf)]:
        cs.store(group="rule", name=name, node=node)
    cs.store(group="scheme", name="nested", node=NestedConf)
    cs.store(group="scheme", name="interleaved", node=InterleavedConf)
    cs.store(group="scheme", name="continuous", node=ContinuousConf)
    cs.store(group="scheme", name="es", node=ESConf)
    cs.store(group="scheme", name="pes", node=PESConf)
    cs.store(group="local", name="none", node=LocalConf)
    cs.store(group="local", name="local", node=LocalConf(inner="local", meta="local"))
    cs.store(group="local", name="mixed", node=LocalConf(inner="mixed", meta="mixed"))
    cs.store(group="local", name="inner_local", node=LocalConf(inner="local", meta="global"))
    cs.store(group="meta", name="default", node=TrainConfig)
    cs.store(group="eval", name="default", node=EvalConf)
    cs.store(group="speedup", name="default", node=SpeedupConf)


# -- builders -----------------------------------------------------------------------------------
def _kwargs(node: DictConfig, drop: str) -> dict:
    d = OmegaConf.to_container(node, resolve=True)
    d.pop(drop, None)
    return d


def build_family(task_cfg, dtype: str = "float32"):
    from metaopt.tasks import make_family
    kw = _kwargs(task_cfg, "family")
    try:
        return make_family(task_cfg.family, dtype=DTYPES[dtype], **kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"task: {e}") from None


def build_rule(rule_cfg):
    from metaopt.rules import make_rule
    try:
        return make_rule(rule_cfg.name, **_kwargs(rule_cfg, "name"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"rule: {e}") from None


def build_scheme(scheme_cfg):
    from metaopt.meta import make_scheme
    try:
        return make_scheme(scheme_cfg.name, **_kwargs(scheme_cfg, "name"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"scheme: {e}") from None


def build_train_config(meta_cfg) -> TrainConfig:
    cfg = TrainConfig(**OmegaConf.to_container(meta_cfg, resolve=True))
    cfg.validate()
    return cfg


def build_local(local_cfg, family, scheme):
    """(family, scheme) with local heads and ``local.meta`` applied; unchanged when ``local`` is
    absent or both modes are ``global`` (today's behaviour, no heads)."""
    if local_cfg is None or (local_cfg.inner == "global" and local_cfg.meta == "global"):
        return family, scheme
    from metaopt.meta.local import LocalMeta
    from metaopt.tasks.local import LocalFamily, LocalTask
    d = OmegaConf.to_container(local_cfg, resolve=True)
    weights = d["weights"][0] if len(d["weights"]) == 1 else d["weights"]
    fam = LocalFamily(family, d["layers"], d["kind"], weights, d["inner"])
    LocalTask(family.sample_seeded(0), d["layers"], d["kind"], weights, d["inner"])  # fail early
    return fam, LocalMeta(scheme, d["meta"], d["mix"])
