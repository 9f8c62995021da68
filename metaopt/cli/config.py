"""Structured configs (dataclasses in Hydra's ConfigStore) for the groups task/, rule/, scheme/,
meta/ and eval/. Typed fields mean a malformed value fails at composition with the key named;
``build_*`` turn a composed config into objects and raise one-line errors naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from metaopt.meta.trainer import DTYPES, TrainConfig


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


# -- rule/ ------------------------------------------------------------------------------------
@dataclass
class RuleConf:
    name: str = MISSING


@dataclass
class SGDRuleConf(RuleConf):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamRuleConf(RuleConf):
    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class LayerwiseConf(RuleConf):
    name: str = "layerwise_lr"
    lr: float = 0.01
    num_steps: int = 20
    direction: str = "sgd"
    act_features: bool = False
    loss_features: bool = False


@dataclass
class PerParamConf(RuleConf):
    name: str = "per_param_lr"
    lr: float = 0.01


@dataclass
class MLPRuleConf(RuleConf):
    name: str = "mlp"
    hidden_size: int = 32
    num_layers: int = 2
    decays: List[float] = field(default_factory=lambda: [0.5, 0.9, 0.99, 0.999])
    rms_decay: float = 0.999
    time_taus: List[float] = field(default_factory=lambda: [1, 3, 10, 30, 100, 300, 1000, 3000])
    act_features: bool = True     # activation-aware: per-layer activation RMS as inputs
    loss_features: bool = True    # loss surprise as an input


@dataclass
class PerTensorRuleConf(RuleConf):
    name: str = "pertensor"
    hidden_size: int = 32
    lr_matrix: float = 0.03
    lr_vector: float = 3e-3
    floor: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    time_taus: List[float] = field(default_factory=lambda: [10, 100, 1000, 10000])
    max_log_mult: float = 3.0


@dataclass
class AnchoredRuleConf(PerTensorRuleConf):
    name: str = "anchored"
    max_log_mult: float = 2.0
    warmup: float = 5.0
    max_relative: float = 0.0
    adapt_range: float = 0.0
    adapt_gain: float = 0.3
    adapt_down: Optional[float] = None


@dataclass
class LookaheadRuleConf(RuleConf):
    name: str = "lookahead"
    inner: str = "sgd"
    k: int = 5
    alpha: float = 0.5


@dataclass
class SGDHDRuleConf(RuleConf):
    name: str = "sgd_hd"
    lr0: float = 1e-3
    beta: float = 1e-3
    momentum: float = 0.0


@dataclass
class AdamHDRuleConf(RuleConf):
    name: str = "adam_hd"
    lr0: float = 1e-3
    beta: float = 1e-7
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


# -- scheme/ ----------------------------------------------------------------------------------
@dataclass
class SchemeConf:
    name: str = MISSING


@dataclass
class NestedConf(SchemeConf):
    name: str = "nested"
    truncation: int = 20
    use_vmap: bool = True
    checkpoint: bool = False


@dataclass
class InterleavedConf(SchemeConf):
    name: str = "interleaved"
    mode: str = "auto"               # auto | forward (exact sensitivities) | one_step
    max_forward_params: int = 128    # auto: forward mode up to this many meta-parameters
    use_vmap: bool = True


@dataclass
class ContinuousConf(SchemeConf):
    name: str = "continuous"
    window: int = 20
    # euler (default) integrates the rule exactly as its discrete update; rk4/dopri5 follow the
    # continuous flow more closely but diverged (NaN) on the MLP rule, whose moment-normalized
    # inputs make the field stiff in the first steps -- use them with sgd/adam/layerwise_lr rules
    method: str = "euler"            # euler | midpoint | rk4 | dopri5 | bosh3 | ...
    gradient: str = "adjoint"        # adjoint | backprop
    eta: float = 1.0                 # time of one inner step
    substeps: int = 1                # fixed-grid solver steps per inner step
    rtol: float = 1e-6
    atol: float = 1e-8
    store_every: int = 1             # adjoint + valid_last: keep the solution every n steps
    use_vmap: bool = True


@dataclass
class ESConf(SchemeConf):
    name: str = "es"
    truncation: int = 20
    num_samples: int = 8             # antithetic pairs per slot
    sigma: float = 0.01
    theta_run: bool = True           # also run theta itself (exact logged loss); false: the
                                     # particles' mean is the slot's run (2N runs, not 2N+1)
    compile: bool = False            # torch.compile the single-task inner step (no steady gain
                                     # over the eager vmapped runs: benchmarks/bench_peers.py)


@dataclass
class PESConf(ESConf):
    name: str = "pes"


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
