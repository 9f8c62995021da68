r"""Lookahead (Zhang, Lucas, Hinton, Ba 2019) and the plumbing shared by wrapper optimizers.

A wrapper optimizer owns no parameter groups of its own: ``param_groups`` *is* the inner
optimizer's list, so LR schedulers, ``zero_grad`` and group edits reach the inner optimizer, and
the wrapper only adds state of its own (slow weights, counters). ``state_dict`` nests the inner
optimizer's state dict and stores the wrapper's per-parameter tensors by parameter index, the
way torch does, so checkpoints load with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Lookahead", "WrapperOptimizer", "build_inner"]

_PULLBACK = ("none", "reset", "pullback")
#: inner-state keys that hold a first moment ("momentum") per parameter
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def build_inner(params, inner, inner_kwargs: Dict[str, Any], owner: str) -> Optimizer:
    """Resolve the ``(params, inner, **inner_kwargs)`` convention of the wrapper optimizers.

    * ``params`` is an :class:`~torch.optim.Optimizer`: wrap it as is;
    * ``inner`` is an :class:`~torch.optim.Optimizer` (``params`` left out): wrap it as is;
    * otherwise ``inner`` is a callable ``inner(params, **inner_kwargs) -> Optimizer``
      (an optimizer class, or a ``functools.partial`` such as hydra's ``_partial_: true``);
      ``None`` means :class:`torch.optim.SGD`.
    """
    if isinstance(params, Optimizer):
        if inner is not None:
            raise ValueError(f"{owner}: got an optimizer instance as params and inner as well")
        params, inner = None, params
    if isinstance(inner, Optimizer):
        if params is not None:
            raise ValueError(f"{owner}: pass either params with an inner optimizer factory, "
                             f"or an inner optimizer instance, not both")
        if inner_kwargs:
            raise ValueError(f"{owner}: inner optimizer keyword arguments "
                             f"{sorted(inner_kwargs)} need an inner factory, not an instance")
        return inner
    if params is None:
        raise ValueError(f"{owner}: params are required when inner is not an Optimizer instance")
    if inner is None:
        inner = torch.optim.SGD
    if not callable(inner):
        raise TypeError(f"Invalid inner: {inner!r} (expected a torch.optim.Optimizer or a "
                        f"callable params -> Optimizer)")
    opt = inner(params, **inner_kwargs)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"Invalid inner: {inner!r} returned {type(opt).__name__}, "
                        f"not a torch.optim.Optimizer")
    return opt


class WrapperOptimizer(Optimizer):
    """Base for optimizers that wrap an inner optimizer and share its ``param_groups``.

    Subclasses keep their per-parameter tensors in ``self.state[p]`` under keys starting with
    ``"slow_"`` and their scalar counters in ``self._counters`` (a dict of ints).

    ``defaults`` are the inner optimizer's defaults plus the wrapper's own hyperparameters, so
    code that inspects them (``OneCycleLR`` looks for ``momentum``/``betas``) sees the inner
    optimizer. ``state_dict()`` has torch.optim's format: ``state`` keyed by parameter index
    (each entry holds the inner optimizer's state and the wrapper's ``slow_*`` tensors),
    ``param_groups`` as the inner optimizer's (the wrapper's counters ride along in every group
    as ``"<wrapper>_<counter>"`` ints, so ``torch.distributed.checkpoint`` keeps them). The
    state-dict hooks of both the wrapper and the inner optimizer fire.
    """

    _OWN_PREFIX = "slow_"

    def __init__(self, inner: Optimizer, defaults: Dict[str, Any]):
        self.optimizer = inner
        self._counters: Dict[str, int] = {}
        # Optimizer.__init__ would build param groups of our own; __setstate__ sets up exactly
        # the rest (hook dicts, profiled step) and is torch's own path for partial construction.
        Optimizer.__setstate__(self, {"defaults": {**inner.defaults, **defaults},
                                      "state": defaultdict(dict)})
        self._own_defaults = dict(defaults)

    # -- shared with the inner optimizer ---------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _counter_key(self, name: str) -> str:
        return f"{type(self).__name__.lower()}_{name}"

    # -- checkpoints -----------------------------------------------------------------------
    @torch._disable_dynamo
    def state_dict(self) -> Dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = self.optimizer.state_dict()
        state = {i: dict(v) for i, v in inner["state"].items()}
        for i, p in enumerate(self._params()):
            own = self.state.get(p)
            if not own:
                continue
            entry = state.setdefault(i, {})
            for k, v in own.items():
                if k in entry:
                    raise RuntimeError(f"{type(self).__name__}.state_dict: the inner optimizer's "
                                       f"state already has a key {k!r}")
                entry[k] = v
        # entries of self.state not keyed by a parameter (a state_dict pre hook may add them)
        # travel as they are, as in torch.optim.Optimizer.state_dict
        for k, v in self.state.items():
            if not isinstance(k, Tensor):
                state[k] = v
        groups = [dict(g) for g in inner["param_groups"]]
        for g in groups:
            for k, v in self._counters.items():
                g[self._counter_key(k)] = int(v)
        sd: Dict[str, Any] = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        other_state: Dict[Any, Any] = {}
        if "inner" in state_dict and "counters" in state_dict:  # the format before 0.1.x
            inner_sd, own_state = state_dict["inner"], state_dict.get("state", {})
            counters = state_dict["counters"]
        else:
            for key in ("state", "param_groups"):
                if key not in state_dict:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: missing key {key!r} "
                                     f"(was it saved by {type(self).__name__}.state_dict?)")
            # saved state is keyed like the saved groups' "params" (indices, or parameter names
            # from torch.distributed.checkpoint); map those keys to indices of this optimizer
            saved_ids = [k for g in state_dict["param_groups"] for k in g["params"]]
            to_index = {k: j for j, k in enumerate(saved_ids)}
            inner_state, own_state, other_state = {}, {}, {}
            for key, entry in state_dict["state"].items():
                if key not in to_index or not isinstance(entry, dict):
                    other_state[key] = entry   # not a parameter's entry: kept as it is
                    continue
                inner = {k: v for k, v in entry.items() if not k.startswith(self._OWN_PREFIX)}
                own = {k: v for k, v in entry.items() if k.startswith(self._OWN_PREFIX)}
                if inner:
                    inner_state[key] = inner  # the inner optimizer maps keys via its groups
                if own:
                    own_state[to_index.get(key, key)] = own
            counters = {}
            prefix = self._counter_key("")
            groups = []
            for g in state_dict["param_groups"]:
                g = dict(g)
                for k in [k for k in g if k.startswith(prefix)]:
                    counters.setdefault(k[len(prefix):], g.pop(k))
                groups.append(g)
            inner_sd = {"state": inner_state, "param_groups": groups}
        self.optimizer.load_state_dict(inner_sd)
        params = list(self._params())
        self.state = defaultdict(dict)
        for i, entry in own_state.items():
            i = int(i)
            if i >= len(params):
                raise ValueError(f"state_dict has state for parameter {i} but the optimizer has "
                                 f"{len(params)} parameters")
            p = params[i]
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype).clone() if isinstance(v, Tensor)
                             and v.is_floating_point() else v for k, v in entry.items()}
        self.state.update(other_state)
        self._counters.update({k: int(v) for k, v in counters.items()})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self._own_defaults.items()
                          if k != "differentiable")
        inner = "\n    ".join(repr(self.optimizer).splitlines())
        return f"{type(self).__name__}({hyper},\n  inner={inner})"


class Lookahead(WrapperOptimizer):
    r"""Lookahead: *k* steps forward with any inner optimizer, then one step back.

    Slow weights :math:`\phi` follow the fast weights :math:`\theta` that the inner optimizer
    :math:`A` moves; every :math:`k` inner steps the slow weights step towards the fast ones and
    the fast weights restart from them (Zhang et al. 2019, Algorithm 1):

    .. math::
        \theta_{t,0} &= \phi_{t-1} \\
        \theta_{t,i} &= \theta_{t,i-1} + A(L, \theta_{t,i-1}, d), \qquad i = 1, \dots, k \\
        \phi_t &= \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}) \qquad
        (\text{and } \theta_{t+1,0} = \phi_t)

    One call of :meth:`step` is one inner step; the interpolation happens on every
    :math:`k`-th call, so the parameters hold the fast weights in between (use
    :meth:`slow_weights` to evaluate the slow ones). :math:`\alpha = 1` recovers the inner
    optimizer exactly.

    Inner momentum at the synchronisation (Section 3 / Appendix of the paper; the options of
    the authors' code):

    * ``"none"`` -- keep the inner state untouched (the paper's default, "maintain");
    * ``"reset"`` -- zero the first-moment buffers (``momentum_buffer``, Adam's ``exp_avg``);
    * ``"pullback"`` -- interpolate them like the weights,
      :math:`m \leftarrow \alpha m + (1 - \alpha) m_{\text{slow}}`, where :math:`m_{\text{slow}}`
      is the (interpolated) buffer cached at the previous synchronisation (initially 0). The
      authors' code aliases the cache to the live buffer, which turns pullback into a no-op
      after the first sync; this implementation caches a copy.

    Args:
        params: parameters / parameter groups, built into ``inner(params, **inner_kwargs)``; or an
            already built :class:`~torch.optim.Optimizer` to wrap.
        inner: the inner optimizer: a callable ``params -> Optimizer`` (an optimizer class or a
            ``functools.partial``; default :class:`torch.optim.SGD`), or an instance (then leave
            ``params`` out).
        k: inner steps per slow step (default 5, the paper's).
        alpha: slow-weight step size in :math:`(0, 1]` (default 0.5, the paper's).
        pullback_momentum: ``"none"`` | ``"reset"`` | ``"pullback"`` (default ``"none"``).
        **inner_kwargs: forwarded to ``inner`` (e.g. ``lr``, ``momentum``).

    Example::

        opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
        opt = Lookahead(model.parameters(), inner=torch.optim.Adam, lr=1e-3)   # same thing, Adam
        ...
        with opt.slow_weights():
            evaluate(model)

    References:
        M. R. Zhang, J. Lucas, G. Hinton, J. Ba. *Lookahead Optimizer: k steps forward, 1 step
        back.* NeurIPS 2019. https://arxiv.org/abs/1907.08610
    """

    def __init__(self, params=None, inner=None, *, k: int = 5, alpha: float = 0.5,
                 pullback_momentum: str = "none", **inner_kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k} (expected an integer >= 1)")
        if not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha} (expected 0 < alpha <= 1)")
        if pullback_momentum not in _PULLBACK:
            raise ValueError(f"Invalid pullback_momentum: {pullback_momentum!r} "
                             f"(expected one of {_PULLBACK})")
        opt = build_inner(params, inner, inner_kwargs, type(self).__name__)
        super().__init__(opt, dict(k=k, alpha=float(alpha), pullback_momentum=pullback_momentum))
        self._counters["la_step"] = 0

    @property
    def k(self) -> int:
        return self._own_defaults["k"]

    @property
    def alpha(self) -> float:
        return self._own_defaults["alpha"]

    # Slow weights start as the parameters seen at their first step with a gradient (not at
    # construction), so loading weights into the model after building the optimizer does what
    # one expects, and a frozen parameter (grad None) gets no state, as in torch.optim. Whether
    # a parameter has a gradient is known only after the closure ran (inside the inner step), so
    # candidates (requires_grad, no slow weights yet) are copied before it and kept after it.
    @torch.no_grad()
    def _slow_candidates(self) -> List[Tuple[Tensor, Tensor]]:
        return [(p, p.detach().clone()) for p in self._params()
                if p.requires_grad and "slow_param" not in self.state.get(p, {})]

    @torch.no_grad()
    def _keep_slow(self, candidates: List[Tuple[Tensor, Tensor]]) -> None:
        for p, before in candidates:
            if p.grad is not None:
                self.state[p]["slow_param"] = before

    @torch.no_grad()
    def _init_slow(self) -> None:
        """Slow weights for the parameters that have a gradient now (closure already ran)."""
        self._keep_slow(self._slow_candidates())

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One inner step (``closure`` is passed to the inner optimizer); every ``k``-th call
        also moves the slow weights and resets the fast weights to them."""
        candidates = self._slow_candidates()
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._keep_slow(candidates)
        self._after_inner_step()
        return loss

    def _after_inner_step(self) -> None:
        self._counters["la_step"] += 1
        if self._counters["la_step"] >= self.k:
            self._counters["la_step"] = 0
            self._synchronize()

    @torch.no_grad()
    def _synchronize(self) -> None:
        # Parameters without a gradient now (frozen, unused by this loss) are skipped like
        # torch.optim skips them: not moved, state untouched; they sync at the next sync step
        # where they have one.
        alpha, mode = self.alpha, self._own_defaults["pullback_momentum"]
        for p in self._params():
            if p.grad is None or "slow_param" not in self.state.get(p, {}):
                continue
            st = self.state[p]
            slow = st["slow_param"]
            slow.add_(p.detach() - slow, alpha=alpha)
            p.copy_(slow)
            if mode == "none":
                continue
            inner_st = self.optimizer.state.get(p, {})
            for key in _MOMENTUM_KEYS:
                buf = inner_st.get(key)
                if not isinstance(buf, Tensor):
                    continue
                if mode == "reset":
                    buf.zero_()
                else:
                    cached = st.setdefault("slow_" + key, torch.zeros_like(buf))
                    buf.mul_(alpha).add_(cached, alpha=1.0 - alpha)
                    cached.copy_(buf)

    @contextlib.contextmanager
    def slow_weights(self):
        """Context manager: parameters hold the slow weights inside, the fast ones after.

        Before the first step the slow weights are the current parameters (nothing changes).
        """
        swapped: List[Tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for p in self._params():
                slow = self.state[p].get("slow_param") if p in self.state else None
                if slow is None:
                    continue
                swapped.append((p, p.detach().clone()))
                p.copy_(slow)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, fast in swapped:
                    p.copy_(fast)
