"""Apply any trained rule to any model as an ordinary ``torch.optim.Optimizer``.

    opt = metaopt.LearnedOptimizer(model.parameters())          # the shipped "default" rule
    opt = metaopt.LearnedOptimizer.from_pretrained(model.named_parameters(), "path/to/ckpt")
    for x, y in data:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

It behaves like the optimizers of ``torch.optim`` (tested against Adam/SGD in
``tests/test_conformity.py``):

* **Param groups.** Each group's ``lr`` (default 1.0) multiplies the rule's update, so LR
  schedulers work; ``add_param_group`` extends the rule state with a fresh ``rule.init`` for the
  new tensors (not possible for spec-dependent rules, whose theta is per tensor: clear error).
* **Parameters whose ``.grad`` is None** (frozen layers, parameters outside this loss) are
  skipped like in torch.optim: they are not moved, and their slice of the rule state is left
  unchanged. The rule runs on the subset of tensors that have gradients (the flat spec and the
  state restricted to them); shared scalars such as the rule's ``step`` advance once per step.
* **State.** The rule keeps its state as a flat dict over the concatenated parameters (fast).
  ``opt.state[p]`` presents it per parameter, the way torch.optim does: per-coordinate entries
  are views of that tensor's slice shaped like the parameter (``m``, ``v`` ...), per-tensor
  entries its element, and shared scalars (``step``, loss statistics) appear under every
  parameter. ``state_dict()["state"]`` is therefore keyed by parameter index, with
  ``param_groups`` (incl. ``param_names``) as in torch; ``load_state_dict`` reassembles the flat
  state. The extra top-level keys ``rule`` and ``theta`` make a full ``state_dict`` self-contained;
  theta is also stored as ``theta.<key>`` under every parameter's entry (like ``step``), so
  ``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict``, which keep only ``state``
  and ``param_groups``, carry it too (``load_state_dict`` takes it from there when the top-level
  ``theta`` is absent). ``state_dict()`` creates the rule state if no step has (step 0, zero
  moments, ``rms0`` from the parameters then), so a fresh optimizer's dict is a complete
  template for ``dcp.load``. ``opt.state`` is a view for reading; write state with
  ``load_state_dict``.
* **Mixed precision.** The rule state of float32/float64 parameters has their dtype. For
  **bf16/fp16 parameters** it is float32 (``step``, ``m``, ``v``, ``rms0``, ``h``: built from
  float32 copies of the parameters), and each step computes the update in float32 on float32
  copies of those parameters and their gradients, then writes the result back rounded to the
  parameter's dtype (the same step as a float32 model holding the same values, tested equal).
  Cost: the state takes 8 bytes per coordinate as for float32 parameters, and each step
  allocates float32 copies of the low-precision parameters and gradients (8 bytes per
  coordinate, transient) and makes three extra passes (two upcasts, one copy back). There are
  no float32 master weights: an update below half a bf16 ulp of a weight is rounded away, as
  with ``torch.optim`` on bf16 parameters; keep float32 parameters (autocast) to avoid that.
  ``load_state_dict`` keeps the saved float32 state (torch's own casts it to the parameters'
  dtype).
* **Sharded parameters** (``DTensor``, from FSDP2's ``fully_shard`` or tensor parallelism) are
  refused with a ``NotImplementedError``; use DDP (see docs/at-scale.md).
* **No closure.** ``loss.backward(); opt.step()`` works (GradScaler, transformers' Trainer). A
  rule that reads the loss (``needs_loss``) then gets a neutral loss -- its running loss mean, so
  the loss-surprise feature is 0 -- and its loss statistics (``loss_mean``/``loss_var``) are left
  as they were. Rules that need activations require ``model=`` (forward hooks).
* **Copies.** ``copy.deepcopy`` and pickling keep rule, theta and state; the activation hooks of
  an activation-aware rule are not copied (call ``attach(model)`` on the copy).

When the rule has an in-place fast path (``Rule.step_``) and the stepped parameters share one
dtype and device, ``step`` uses it (the same update up to rounding); like ``torch.optim``, the
state tensors are then updated in place, so a ``state_dict()`` kept across steps changes with
them (deep-copy it to keep a snapshot).
"""
from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from metaopt.activations import ActivationRecorder
from metaopt.rules.base import Rule, make_rule
from metaopt.rules.io import (PRETRAINED_DIR, CheckpointError, check_theta, load_rule,
                              resolve_rule_path, spec_mismatch)
from metaopt.rules.layout import GLOBAL, Layout
from metaopt.types import FlatSpec, Params, State

__all__ = ["LearnedOptimizer", "PRETRAINED_DIR", "DEFAULT_RULE"]  # PRETRAINED_DIR: shipped rules

#: the shipped rule that ``LearnedOptimizer(params)`` (no rule) loads
DEFAULT_RULE = "default"
#: rule-state keys that hold running loss statistics (rules.features.init_surprise_state)
_LOSS_STAT_KEYS = ("loss_mean", "loss_var")

#: param-group keys LearnedOptimizer reads or that torch itself adds (schedulers: initial_lr)
_GROUP_KEYS = {"lr", "weight_decay", "param_names", "initial_lr"}
#: below this, a group lr is most likely an Adam learning rate passed out of habit
_SMALL_LR = 0.1
#: parameter dtypes whose rule state is float32 and whose update is computed in float32
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: prefix of the theta entries stored under every parameter's ``state_dict()["state"]`` entry
_THETA_PREFIX = "theta."


def _state_view(p: Tensor) -> Tensor:
    """What the rule state is built from: float32 for low-precision parameters."""
    return p.detach().float() if p.dtype in _LOW_PRECISION else p


def _refuse_dtensors(params, first: int) -> None:
    """A one-line NotImplementedError for sharded (``DTensor``) parameters, e.g. from FSDP2's
    ``fully_shard``: the rule keeps one flat state over all the parameters' coordinates and
    reduces each tensor whole, which shards cannot do yet (docs/at-scale.md)."""
    mod = sys.modules.get("torch.distributed.tensor")   # not imported: no DTensor exists
    dtensor = getattr(mod, "DTensor", None)
    if dtensor is None:
        return
    for j, p in enumerate(params):
        if isinstance(p, dtensor):
            raise NotImplementedError(
                f"LearnedOptimizer: parameter {first + j} is a DTensor (placements "
                f"{list(p.placements)}; FSDP2 fully_shard / tensor parallel): sharded parameters "
                f"are not supported yet (the rule's state and per-tensor statistics need whole "
                f"tensors); use DDP or unsharded parameters")


def _check_group(group: dict, rule: Rule, where: str) -> None:
    """One-line errors for group keys this optimizer would silently ignore, and a warning for an
    Adam-style ``lr`` (here ``lr`` multiplies the learned step; 1.0 is the step as meta-trained)."""
    at = f"{where} " if where else ""
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"LearnedOptimizer: {at}key {unknown[0]!r} is not supported (the rule "
                         f"sets its own update; supported group keys: lr, weight_decay)")
    lr = group.get("lr", 1.0)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"Invalid lr: {lr}")
    wd = group.get("weight_decay", 0.0)
    if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not wd >= 0:
        raise ValueError(f"Invalid weight_decay: {wd}")
    if wd and not rule.supports_weight_decay:
        raise ValueError(f"LearnedOptimizer: {at}weight_decay={wd}, but rule {rule.name!r} does "
                         f"not support weight decay (use the default rule, or weight_decay=0)")
    if 0 < lr < _SMALL_LR:
        warnings.warn(f"LearnedOptimizer: {at}lr={lr:g} multiplies the learned step (lr=1.0, the "
                      f"default, is the step as meta-trained; it is not Adam's learning rate), so "
                      f"every step is {1 / lr:.0f}x smaller; omit lr unless you mean that",
                      UserWarning, stacklevel=4)


class _Active(NamedTuple):
    """What one step moves: the tensors with a gradient (``idx`` into all of them, None when all
    have one) and their share of spec, state, theta and param-group settings."""
    idx: Optional[List[int]]
    spec: FlatSpec
    params: List[Tensor]
    grads: List[Tensor]
    state: State
    theta: Params
    lrs: List[float]
    decays: List[float]


class _ParamState(defaultdict):
    """``opt.state``: per-parameter dicts (torch.optim's layout). ``state["rule"]`` -- looked up,
    never stored -- is the flat rule state (the layout before per-parameter state; prefer
    ``opt.rule_state``)."""

    def __init__(self, flat_fn=None, *args):
        super().__init__(dict, *args)
        self._flat_fn = flat_fn

    def __missing__(self, key):
        if isinstance(key, str) and key == "rule" and self._flat_fn is not None:
            flat = self._flat_fn()
            if flat is not None:
                return flat
        return super().__missing__(key)

    def __reduce__(self):  # copies are plain per-parameter dicts
        return (defaultdict, (dict,), None, None, iter(self.items()))


class LearnedOptimizer(torch.optim.Optimizer):
    """A trained update rule used as a ``torch.optim.Optimizer``.

    ``LearnedOptimizer(model.parameters())`` loads the shipped ``"default"`` rule;
    ``LearnedOptimizer.from_pretrained(model.named_parameters(), path)`` loads a rule
    checkpoint written by ``metaopt-train``. Use it like any torch optimizer
    (``zero_grad``/``backward``/``step``, param groups, LR schedulers, ``state_dict``).
    The rule state has the parameters' dtype for float32/float64 parameters and is float32 for
    bf16/fp16 ones, whose update is computed in float32 and written back rounded.
    See the module docstring for the details of state, mixed precision, closures and copies.
    """

    def __init__(self, params, rule: Union[Rule, str, None] = None, theta: Optional[Params] = None,
                 lr: float = 1.0, model: Optional[nn.Module] = None, seed: int = 0,
                 weight_decay: float = 0.0):
        """``rule``: a Rule, a rule name (default kwargs, fresh theta; build others with
        ``make_rule``), or None for the shipped ``"default"`` rule with its trained theta.
        ``theta``: trained meta-parameters (default: the checkpoint's for ``rule=None``, else the
        rule's fresh init from ``seed``). ``lr``: per-group multiplier of the rule's update.
        ``model``: needed by activation-aware rules (forward hooks record each layer's
        activation statistics); also names unnamed parameters. ``weight_decay``: decoupled
        (AdamW-style) decay per group, for rules with ``supports_weight_decay`` (the shipped
        default: ``p <- p - lr * wd * lr_i * p`` at the rule's learned per-tensor rate ``lr_i``,
        see :mod:`metaopt.rules.anchored`); other rules reject a nonzero value."""
        if rule is None:
            rule, ckpt_theta, _ = load_rule(resolve_rule_path(DEFAULT_RULE))
            if theta is None and not rule.spec_dependent:
                theta = ckpt_theta
        elif isinstance(rule, str):
            rule = make_rule(rule)
        elif not isinstance(rule, Rule):
            raise TypeError(f"Invalid rule: {rule!r} (expected a metaopt Rule, a rule name or None)")
        self.rule = rule
        _check_group({"lr": lr, "weight_decay": weight_decay}, rule, "")
        self._flat: Optional[State] = None
        self._views_stale = False
        self._model_names = ({id(p): n for n, p in model.named_parameters()}
                             if model is not None else {})
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._rebuild_spec()
        expected = self.rule.init_theta(self.spec, torch.Generator().manual_seed(seed))
        if theta is None:
            theta = expected
        check_theta(theta, expected, where=f"theta for rule {self.rule.name!r}")
        device = self._plist()[0].device if self._plist() else None
        self.theta = {k: v.detach().to(device) for k, v in theta.items()}
        self._recorder = None
        if self.rule.needs_activations:
            if model is None:
                raise ValueError(f"rule {self.rule.name!r} uses activation features: pass "
                                 f"model=<your nn.Module> (or use a rule with needs_activations=False)")
            self.attach(model)
        self._ready = True

    # -- construction from checkpoints ---------------------------------------------------------
    @classmethod
    def from_pretrained(cls, params, name_or_path: Union[str, Path] = DEFAULT_RULE, **kwargs):
        """Load a rule checkpoint directory (theta.safetensors + rule.json), or a shipped name."""
        path = resolve_rule_path(name_or_path)
        return cls.from_loaded(params, *load_rule(path), where=str(path), **kwargs)

    @classmethod
    def from_loaded(cls, params, rule: Rule, theta: Params, meta: dict, where: str = "checkpoint",
                    **kwargs):
        """From a checkpoint already read by :func:`metaopt.rules.io.load_rule` (``rule, theta,
        meta``), e.g. once for many models; a spec-dependent rule is checked against them."""
        opt = cls(params, rule=rule, theta=theta if not rule.spec_dependent else None, **kwargs)
        if rule.spec_dependent:
            why = spec_mismatch(meta.get("spec"), opt.spec)
            if why:
                raise CheckpointError(f"{where}: {why}")
            check_theta(theta, opt.theta, where=where)
            opt.theta = {k: v.to(opt.theta[k].device) for k, v in theta.items()}
        return opt

    def attach(self, model: nn.Module) -> None:
        """(Re)register the forward hooks that record activation statistics on ``model``."""
        self.close()
        self._model_names = {id(p): n for n, p in model.named_parameters()}
        self._rebuild_spec()
        if self.rule.needs_activations:
            self._recorder = ActivationRecorder(model).__enter__()

    def close(self):
        """Remove the activation hooks (only registered for activation-aware rules)."""
        rec = self.__dict__.get("_recorder")
        if rec is not None:
            rec.__exit__(None, None, None)
            self._recorder = None

    # -- parameters, names, spec -----------------------------------------------------------------
    def _plist(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _rebuild_spec(self) -> None:
        old = self.__dict__.get("_names") or []
        names: List[str] = []
        for g in self.param_groups:
            given = g.get("param_names")
            for j, p in enumerate(g["params"]):
                n = given[j] if given is not None else self._model_names.get(id(p))
                if n is None and len(names) < len(old):
                    n = old[len(names)]
                names.append(n if n is not None else f"param{len(names)}")
        if len(set(names)) != len(names):  # duplicates (e.g. mixing sources): positional names
            names = [f"param{i}" for i in range(len(names))]
        self._names = names
        self.spec = FlatSpec(tuple(names), tuple(tuple(p.shape) for p in self._plist()))

    def add_param_group(self, param_group) -> None:
        if isinstance(param_group, dict):
            where = f"param_groups[{len(self.param_groups)}]"
            _check_group({k: v for k, v in param_group.items() if k != "params"}, self.rule, where)
        if not self.__dict__.get("_ready"):  # called from Optimizer.__init__
            first = len(self._plist())
            super().add_param_group(param_group)
            return _refuse_dtensors(self.param_groups[-1]["params"], first)
        if self.rule.spec_dependent:
            raise ValueError(f"add_param_group: rule {self.rule.name!r} is spec-dependent (its theta "
                             f"has one entry per parameter tensor of the model it was trained for), "
                             f"so it cannot take new parameters")
        old_spec = self.spec
        flat = self._flat
        super().add_param_group(param_group)
        try:
            _refuse_dtensors(self.param_groups[-1]["params"], old_spec.num_tensors)
        except NotImplementedError:
            self.param_groups.pop()
            raise
        self._rebuild_spec()
        if flat is not None:
            new = self._plist()[old_spec.num_tensors:]
            new_names = self._names[old_spec.num_tensors:]
            fresh = self._init_state(new_names, new)
            self._flat = Layout(self.rule.state_layout, flat, old_spec).extend(flat, fresh)
            self._views_stale = True

    # -- per-parameter state ---------------------------------------------------------------------
    @property
    def state(self):  # type: ignore[override]
        st = self.__dict__["state"]
        if not isinstance(st, _ParamState):
            st = self.__dict__["state"] = _ParamState(lambda: self._flat, st)
        if self.__dict__.get("_views_stale"):
            self._write_views(st)
        return st

    @property
    def rule_state(self) -> Optional[State]:
        """The rule's flat state (None before the first step)."""
        return self._flat

    def _rule_state(self, params=None) -> State:
        """The flat rule state, initialized if needed."""
        if self._flat is None:
            self._flat = self._init_state()
            self._views_stale = True
        return self._flat

    def _init_state(self, names=None, params=None) -> State:
        """The rule's fresh state for ``params`` (default: all), built from float32 copies of
        low-precision (bf16/fp16) parameters so that its floating-point entries are float32."""
        names = self._names if names is None else names
        params = self._plist() if params is None else params
        with torch.no_grad():
            return self.rule.init({n: _state_view(p) for n, p in zip(names, params)})

    @state.setter
    def state(self, value):
        self.__dict__["state"] = value

    def _layout(self, flat: State) -> Layout:
        """How the flat state maps onto the parameters (the rule's declaration)."""
        return Layout(self.rule.state_layout, flat, self.spec)

    def _write_views(self, st) -> None:
        self.__dict__["_views_stale"] = False
        st.clear()
        flat = self._flat
        if flat is None:
            return
        layout = self._layout(flat)
        for i, p in enumerate(self._plist()):
            st[p] = {k: layout.part(k, v, i) for k, v in flat.items()}

    def _assemble(self, entries: List[Optional[dict]]) -> None:
        """Rebuild the flat rule state from the saved per-parameter entries (one per parameter,
        in order; cast to the fresh state's dtype and device); a tensor without saved state gets
        the rule's fresh init."""
        self._views_stale = True
        plist = self._plist()
        if not any(entries):
            self._flat = None
            return
        expected = self._init_state()
        layout = self._layout(expected)
        flat = {}
        for k, ref in expected.items():
            parts = []
            for i, p in enumerate(plist):
                want = layout.part(k, ref, i)
                got = (entries[i] or {}).get(k)
                if got is None:
                    got = want  # no saved state for this tensor: fresh init
                if not isinstance(got, Tensor) or tuple(got.shape) != tuple(want.shape):
                    raise CheckpointError(
                        f"state_dict['state'][{i}][{k!r}] has shape "
                        f"{list(got.shape) if isinstance(got, Tensor) else type(got).__name__}, "
                        f"this optimizer expects {list(want.shape)} for parameter {self._names[i]!r}")
                if got is not want or layout.kinds[k] != GLOBAL:  # shared: the first saved
                    parts.append(got)
            flat[k] = layout.assemble(k, ref, parts or [ref])
        self._flat = flat

    def _rule_state_keys(self):
        if self._flat is not None:
            return list(self._flat)
        return list(self._init_state())

    # -- the step -----------------------------------------------------------------------------------
    def _can_step_(self, plist, state, glist=None) -> bool:
        """Whether the rule's in-place ``step_`` applies: it has one, and params, grads and
        state share one dtype and device (otherwise ``update``'s type promotion is kept)."""
        if not self.rule.has_step_() or not plist:
            return False
        if glist is None:
            glist = [p.grad if p.grad is not None else p for p in plist]
        dtype, device = plist[0].dtype, plist[0].device
        for p, g in zip(plist, glist):
            if p.dtype != dtype or p.device != device or g.is_sparse or g.dtype != dtype \
                    or g.device != device:
                return False
        return all(v.device == device and (not v.is_floating_point() or v.dtype == dtype)
                   for v in state.values())

    # Under torch.compile the step runs eagerly (a graph break): inductor's lowering of the
    # in-place fast path deviated from eager by 4e-3 at step 3 (float32 and float64; the
    # eager/aot_eager backends match exactly), and dynamo lost the rule-state update of the
    # ``update`` path. See benchmarks/compile_optimizers.py.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.rule.needs_activations and self._recorder is None:
            raise ValueError(f"rule {self.rule.name!r} uses activation features and no model is "
                             f"attached (a copied/unpickled optimizer has no hooks): call opt.attach(model)")
        active = self._select_active()
        if active is not None:
            ctx, kept = self._context(active, loss)
            new_state = {**self._apply(active, ctx), **kept}
            self._flat = new_state if active.idx is None else \
                self._layout(self._flat).write_(self._flat, new_state, active.idx)
            self._views_stale = True
        return loss

    def _select_active(self) -> Optional["_Active"]:
        """The parameters this step moves -- those with a gradient, as torch.optim skips the
        others -- with their share of the rule state (and of a spec-dependent theta), or None."""
        plist = self._plist()
        flat = self._rule_state()
        idx = [i for i, p in enumerate(plist) if p.grad is not None]
        if not idx:
            return None
        groups = [g for g in self.param_groups for _ in g["params"]]
        spec, state, theta = self.spec, flat, self.theta
        if len(idx) < len(plist):
            spec = FlatSpec(tuple(spec.names[i] for i in idx), tuple(spec.shapes[i] for i in idx))
            state = self._layout(flat).select(flat, idx)
            if self.rule.spec_dependent:
                theta = Layout(self.rule.theta_layout, theta, self.spec, "theta").select(theta, idx)
            plist, groups = [plist[i] for i in idx], [groups[i] for i in idx]
        else:
            idx = None
        return _Active(idx, spec, plist, [p.grad for p in plist], state, theta,
                       [float(g["lr"]) for g in groups],
                       [float(g.get("weight_decay", 0.0)) for g in groups])

    def _context(self, active: "_Active", loss):
        """The rule's ``ctx``, and the state entries to keep as they were. Without a closure, a
        rule that reads the loss gets a neutral one (its running mean, so the surprise is 0) and
        its loss statistics are kept."""
        lval = loss.detach() if isinstance(loss, Tensor) else (
            torch.as_tensor(loss) if loss is not None else None)
        kept = {}
        if self.rule.needs_loss and lval is None:
            kept = {k: active.state[k].clone() for k in _LOSS_STAT_KEYS if k in active.state}
            ref = active.state.get("loss_mean")
            lval = ref.clone() if isinstance(ref, Tensor) else active.params[0].new_zeros(())
        ctx = {"loss": lval,
               "act": dict(self._recorder.stats) if self._recorder is not None else None}
        if any(active.decays):  # absent when all zero: the update is exactly the rule's own
            ctx["weight_decay"] = active.decays
        return ctx, kept

    def _apply(self, a: "_Active", ctx) -> State:
        """Move the active parameters by the rule's update, scaled by their group's ``lr``
        (through the in-place fast path where it applies); returns the rule's new state.
        Low-precision (bf16/fp16) parameters are stepped as float32 copies of themselves and
        their gradients, written back rounded to their dtype."""
        low = [i for i, p in enumerate(a.params) if p.dtype in _LOW_PRECISION]
        if not low:
            return self._apply_full(a, ctx)
        params = [p.float() if i in low else p for i, p in enumerate(a.params)]
        grads = [g.float() if g.dtype in _LOW_PRECISION else g for g in a.grads]
        new_state = self._apply_full(a._replace(params=params, grads=grads), ctx)
        for i in low:
            a.params[i].copy_(params[i])
        return new_state

    def _apply_full(self, a: "_Active", ctx) -> State:
        if self._can_step_(a.params, a.state, a.grads):
            return self.rule.step_(a.theta, a.params, a.grads, a.state, a.spec, ctx, a.lrs)
        updates, new_state = self.rule.update(a.theta, dict(zip(a.spec.names, a.grads)), a.state,
                                              dict(zip(a.spec.names, a.params)), ctx)
        for p, n, s in zip(a.params, a.spec.names, a.lrs):
            u = updates[n].to(p.dtype)
            p.add_(u, alpha=s) if s != 1.0 else p.add_(u)
        return new_state

    # -- serialization ------------------------------------------------------------------------------
    def state_dict(self):
        """torch's layout, complete from construction on (a fresh optimizer's rule state is
        created here, so the dict is a template that ``dcp.load`` can fill), with theta both at
        the top level and as ``theta.<key>`` under every parameter's entry (where
        ``get_optimizer_state_dict``, which keeps only ``state`` and ``param_groups``, keeps it)."""
        self._rule_state()
        sd = super().state_dict()
        theta = {k: v.clone() for k, v in self.theta.items()}
        per = {_THETA_PREFIX + k: v for k, v in theta.items()}
        n = len(self._plist())
        sd["state"] = {i: ({**e, **per} if isinstance(i, int) and 0 <= i < n and isinstance(e, dict)
                           else e) for i, e in sd["state"].items()}
        sd["theta"] = theta
        sd["rule"] = self.rule.describe()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        theta = state_dict.pop("theta", None)
        rule_desc = state_dict.pop("rule", None)
        if rule_desc is not None and rule_desc != self.rule.describe():
            raise CheckpointError(f"state_dict is for rule {rule_desc}, this optimizer has "
                                  f"{self.rule.describe()}")
        if "state" in state_dict and "rule" in state_dict["state"]:
            raise CheckpointError("state_dict['state'] holds a flat 'rule' entry (the format before "
                                  "per-parameter state); re-save it with this version")
        if theta is not None:
            check_theta(theta, self.theta, where="state_dict['theta']")
        for i, g in enumerate(state_dict.get("param_groups", [])):
            foreign = sorted(set(g) - _GROUP_KEYS - {"params"})
            if foreign:
                raise CheckpointError(
                    f"state_dict['param_groups'][{i}] has key {foreign[0]!r}: not a "
                    f"LearnedOptimizer state_dict (one of another torch.optim optimizer?)")
        expected_keys = set(self._rule_state_keys()) | {_THETA_PREFIX + k for k in self.theta}
        for i, entry in (state_dict.get("state") or {}).items():
            extra = sorted(set(entry) - expected_keys) if isinstance(entry, dict) else []
            if extra:
                raise CheckpointError(
                    f"state_dict['state'][{i}] has key {extra[0]!r}, which rule "
                    f"{self.rule.name!r} does not keep (expected {sorted(expected_keys)}): not "
                    f"a state_dict of this optimizer")
        # the state as torch's load_state_dict gets it (after the user's pre-hooks), uncast:
        # torch casts every entry but ``step`` to its parameter's dtype, which would round the
        # float32 state of bf16/fp16 parameters and theta
        seen = []
        handle = self.register_load_state_dict_pre_hook(lambda opt, sd: seen.append(sd))
        self._views_stale = False
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        saved = seen[-1] if seen else state_dict
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        entries = [(saved.get("state") or {}).get(i) for i in ids]
        entries = [e if isinstance(e, dict) else None for e in entries]
        if theta is None:   # get/set_optimizer_state_dict keep theta only in the entries
            theta = next(({k[len(_THETA_PREFIX):]: v for k, v in e.items()
                           if k.startswith(_THETA_PREFIX)} for e in entries
                          if e and any(k.startswith(_THETA_PREFIX) for k in e)), None)
            if theta is not None:
                check_theta(theta, self.theta, where="state_dict['state'] theta entries")
        if theta is not None:
            self.theta = {k: v.detach().clone().to(self.theta[k].device) for k, v in theta.items()}
        self._rebuild_spec()
        self._assemble([{k: v for k, v in e.items() if not k.startswith(_THETA_PREFIX)}
                        if e else None for e in entries])

    # -- copies ---------------------------------------------------------------------------------------
    def __getstate__(self):
        d = {k: v for k, v in self.__dict__.items()
             if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}
        d["_recorder"] = None
        d["_model_names"] = {}
        d["state"] = defaultdict(dict)  # views are rebuilt from the flat state
        d["_views_stale"] = True
        return d

    def __setstate__(self, state):
        super().__setstate__(state)
