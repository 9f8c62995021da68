"""Local per-layer losses: an auxiliary readout (a "head") after hidden layers of a layered task.

A layered network is cut into *blocks* after the layers that get a head; the last block ends with
the network's own output and criterion (its "head" is the network's head). Block ``l`` maps its
input ``x_{l-1}`` to ``x_l``; its local loss is ``head_l(x_l)`` scored against the task's targets
with the task's loss (``kind="linear"``), or a reconstruction of the block's own input
(``kind="recon"``: half mean squared error, for unsupervised tasks).

:class:`LocalTask` wraps a task; its ``apply`` (the loss every rule and scheme trains on) is

* ``inner="global"``: the end loss, plus each head's loss on the *detached* hidden state, so the
  body is trained exactly as without heads and the heads are trained as linear probes (the local
  meta-loss needs trained heads);
* ``inner="local"``: ``sum_l weight_l * local_l`` with every block's input detached: greedy
  layer-wise learning, no gradient flows from block ``l+1`` into block ``l``;
* ``inner="mixed"``: the end loss plus ``sum_l weight_l * local_l`` without detaching (deep
  supervision).

Head parameters (``heads.<l>.weight``/``bias``) belong to the task: the rule trains them like any
weight; they are not part of theta. Supported: MLP (and autoencoder), conv and char-LM tasks, and
a user's layered model as :class:`SequentialModule` (an ``nn.Sequential`` body, a readout and a
criterion).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaopt.tasks.base import Task, TaskFamily
from metaopt.tasks.mlp import l2_penalty
from metaopt.types import Batch, Params

INNER_MODES = ("global", "local", "mixed")
HEAD_KINDS = ("linear", "recon")


# -- the layered view of the supported modules ----------------------------------------------------
def _layered(module: nn.Module):
    """(num_units, unit(i, h), readout(h), criterion(out, y), unit_params(i), readout_params)
    of a supported module; parameter names are those of ``module.named_parameters()``."""
    from metaopt.tasks.charlm import CharLMModule
    from metaopt.tasks.conv import ConvModule
    from metaopt.tasks.mlp import ACTIVATIONS, MLPModule, supervised_loss

    if isinstance(module, MLPModule):
        act = ACTIVATIONS[module.activation]
        n = len(module.layers) - 1

        def unit(i, h):
            h = h.flatten(1) if (i == 0 and h.dim() > 2) else h
            h = module.layers[i](h)
            if module.norms is not None:
                h = module.norms[i](h)
            return act(h)

        def unit_names(i):
            names = [f"layers.{i}.weight", f"layers.{i}.bias"]
            if module.norms is not None:
                names += [f"norms.{i}.weight", f"norms.{i}.bias"]
            return names

        def readout(h):
            h = h.flatten(1) if (n == 0 and h.dim() > 2) else h
            return module.layers[n](h)
        return (n, unit, readout, lambda o, y: supervised_loss(module.loss_kind, o, y), unit_names,
                [f"layers.{n}.weight", f"layers.{n}.bias"], module.l2)
    if isinstance(module, ConvModule):
        act = ACTIVATIONS[module.activation]
        return (len(module.convs), lambda i, h: act(module.convs[i](h)),
                lambda h: module.head(h.flatten(1)),
                lambda o, y: supervised_loss(module.loss_kind, o, y),
                lambda i: [f"convs.{i}.weight", f"convs.{i}.bias"],
                ["head.weight", "head.bias"], module.l2)
    if isinstance(module, CharLMModule):
        import torch.nn.functional as F

        def unit(i, h):
            if i == 0:  # the embeddings belong to the first block
                h = module.tok(h) + module.pos(torch.arange(h.shape[-1], device=h.device))
            return module.blocks[i](h)

        def unit_names(i):
            names = [f"blocks.{i}.{k}" for k, _ in module.blocks[i].named_parameters()]
            return (["tok.weight", "pos.weight"] if i == 0 else []) + names

        def criterion(o, y):
            return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))
        if len(module.blocks) == 0:
            raise ValueError("local: a char_lm task needs n_layers >= 1")
        return (len(module.blocks), unit, lambda h: module.head(module.ln_f(h)), criterion,
                unit_names, ["ln_f.weight", "ln_f.bias", "head.weight", "head.bias"], 0.0)
    if isinstance(module, SequentialModule):
        n = len(module.body)
        return (n, lambda i, h: module.body[i](h), module.readout, module.criterion,
                lambda i: [f"body.{i}.{k}" for k, _ in module.body[i].named_parameters()],
                [f"readout.{k}" for k, _ in module.readout.named_parameters()], 0.0)
    raise ValueError(f"local: task module {type(module).__name__} has no layered structure "
                     f"(supported: MLPModule, ConvModule, CharLMModule, SequentialModule)")


class SequentialModule(nn.Module):
    """A user's layered model for local losses: ``body`` (an ``nn.Sequential`` of hidden units),
    ``readout`` (the output layer) and a ``criterion(out, y)``; ``forward(x, y)`` is the loss."""

    def __init__(self, body: nn.Sequential, readout: nn.Module, criterion):
        super().__init__()
        self.body, self.readout, self.criterion = body, readout, criterion

    def forward(self, x, y=None):
        out = self.readout(self.body(x))
        return out if y is None else self.criterion(out, y)


# -- the wrapped module ---------------------------------------------------------------------------
class LocalModule(nn.Module):
    """``net`` (the task's module) plus one head per cut; see the module docstring."""

    def __init__(self, net: nn.Module, cuts: Sequence[int], kind: str, weights: Sequence[float],
                 inner: str, head_dims: Sequence[Tuple[int, int]]):
        super().__init__()
        self.net = net
        self.cuts, self.kind, self.inner = tuple(cuts), kind, inner
        self.weights = tuple(float(w) for w in weights)
        self.heads = nn.ModuleList(nn.Linear(a, b) for a, b in head_dims)
        (self.num_units, self._unit, self._readout, self._criterion, self._unit_names,
         self._readout_names, self._l2) = _layered(net)
        # block l = units bounds[l] .. bounds[l+1]-1 (the last block also holds the readout)
        self.bounds = (0, *(c + 1 for c in self.cuts), self.num_units)
        self.num_blocks = len(self.cuts) + 1

    # parameter names of block l (its units, its head; the last block: the readout)
    def block_names(self, l: int) -> List[str]:
        names = [f"net.{n}" for i in range(self.bounds[l], self.bounds[l + 1])
                 for n in self._unit_names(i)]
        if l < self.num_blocks - 1:
            names += [f"heads.{l}.weight", f"heads.{l}.bias"]
        else:
            names += [f"net.{n}" for n in self._readout_names]
        return names

    def _tensors(self) -> Dict[str, Tensor]:
        return dict(self.named_parameters())

    def block(self, l: int, h: Tensor) -> Tensor:
        for i in range(self.bounds[l], self.bounds[l + 1]):
            h = self._unit(i, h)
        return h

    def block_loss(self, l: int, x_in: Tensor, h: Tensor, y: Tensor, penalty: bool = True) -> Tensor:
        """Block l's local loss from its input ``x_in`` and output ``h``; with ``penalty`` the weight
        penalty of the block's own weights is included (the blocks' penalties sum to the task's)."""
        pen = self.penalty(l) if penalty else 0.0
        if l == self.num_blocks - 1:
            return self._criterion(self._readout(h), y) + pen
        feat = h.flatten(1) if (h.dim() == 4 or self.kind == "recon") else h
        out = self.heads[l](feat)
        if self.kind == "recon":
            return 0.5 * (out - x_in.detach().flatten(1).to(out.dtype)).pow(2).mean() + pen
        return self._criterion(out, y) + pen

    def penalty(self, l: int):
        if not self._l2:
            return 0.0
        t = self._tensors()
        return l2_penalty((t[n] for n in self.block_names(l) if n.startswith("net.")), self._l2)

    def block_inputs(self, x: Tensor) -> List[Tensor]:
        """The input of every block and the last block's output (num_blocks + 1 tensors)."""
        hs = [x]
        for l in range(self.num_blocks):
            hs.append(self.block(l, hs[-1]))
        return hs

    def forward(self, x: Tensor, y: Optional[Tensor] = None, what: str = "inner",
                block: int = -1):
        if what == "block":     # block ``block``'s local loss from its (given) input x
            return self.block_loss(block, x, self.block(block, x), y)
        if what == "block_out":  # the same and the block's output (the next block's input)
            h = self.block(block, x)
            return self.block_loss(block, x, h, y), h
        if what == "inputs":    # every block's input (x_0 = raw input) and the last output
            return tuple(self.block_inputs(x))
        if y is None:           # the network's outputs (heads unused)
            return self._readout(self.block_inputs(x)[-1])
        last = self.num_blocks - 1
        if what == "end":       # the task's own loss
            h = self.block_inputs(x)
            return self.block_loss(last, h[-2], h[-1], y) + sum(self.penalty(l) for l in range(last))
        if what != "inner":
            raise ValueError(f"Invalid what: {what!r}")
        total, h = 0.0, x
        for l in range(self.num_blocks):
            x_in = h.detach() if (self.inner == "local" and l > 0) else h
            h = self.block(l, x_in)
            if l == last:
                total = total + self.block_loss(l, x_in, h, y)
            elif self.inner == "local":
                total = total + self.weights[l] * self.block_loss(l, x_in, h, y)
            elif self.inner == "mixed":   # deep supervision: head losses reach every block below
                total = total + self.weights[l] * self.block_loss(l, x_in, h, y, penalty=False) \
                    + self.penalty(l)
            else:  # global: heads learn as probes on the detached state; the body sees the end loss
                total = total + self.block_loss(l, x_in, h.detach(), y, penalty=False) \
                    + self.penalty(l)
        return total


class LocalTask(Task):
    """A layered task with local heads (see the module docstring).

    ``layers``: indices of the hidden units that get a head (a cut after them; ``None`` = every
    hidden unit); ``kind``: ``linear`` | ``recon``; ``weights``: one local-loss weight per head
    (a single number applies to all); ``inner``: ``global`` | ``local`` | ``mixed``.
    """

    def __init__(self, base: Task, layers: Optional[Sequence[int]] = None, kind: str = "linear",
                 weights=1.0, inner: str = "local"):
        if inner not in INNER_MODES:
            raise ValueError(f"Invalid local.inner: {inner!r} (use one of {', '.join(INNER_MODES)})")
        if kind not in HEAD_KINDS:
            raise ValueError(f"Invalid local.kind: {kind!r} (use one of {', '.join(HEAD_KINDS)})")
        if type(base).apply is not Task.apply or set(base.param_shapes()) != {
                n for n, _ in base.module.named_parameters()}:
            raise ValueError(f"local: task {base!r} ({type(base).__name__}) computes its loss its "
                             f"own way; local heads need a plain layered task (task=digits_mlp, "
                             f"digits_conv, digits_ae or char_lm)")
        n_units = _layered(base.module)[0]
        cuts = tuple(range(n_units - 1)) if layers is None else tuple(sorted(int(i) for i in layers))
        if any(c < 0 or c >= n_units - 1 for c in cuts) or len(set(cuts)) != len(cuts):
            raise ValueError(f"Invalid local.layers: {list(cuts)} (hidden units 0..{n_units - 2} "
                             f"can get a head; the last unit's head is the network's own)")
        if isinstance(weights, (int, float)):
            weights = [float(weights)] * len(cuts)
        weights = [float(w) for w in weights]
        if len(weights) != len(cuts) or any(w < 0 for w in weights):
            raise ValueError(f"Invalid local.weights: {weights} (one non-negative weight per head, "
                             f"{len(cuts)} heads)")
        self.base = base
        head_dims = self._head_dims(base, cuts, kind)
        module = LocalModule(base.module, cuts, kind, weights, inner, head_dims)
        dtype = next(iter(base.module.parameters())).dtype
        module = module.to(dtype)
        structure = ("local", base.structure, cuts, kind, tuple(weights), inner)
        super().__init__(base.name, module, data=base.data, batch_size=base.batch_size,
                         init_scale=base.init_scale, structure=structure,
                         buffers={f"net.{k}": v for k, v in base.buffers.items()})
        self.inner = inner

    @staticmethod
    def _head_dims(base: Task, cuts, kind):
        num, unit, readout, *_ = _layered(base.module)
        x, _ = base.data.sample("train", 2, torch.Generator().manual_seed(0))
        if kind == "recon" and not x.is_floating_point():
            raise ValueError("Invalid local.kind: 'recon' needs real-valued inputs (use 'linear')")
        with torch.no_grad():
            hs = [x]
            for i in range(num):
                hs.append(unit(i, hs[-1]))
            n_out = int(readout(hs[-1]).shape[-1])
        dims, start = [], 0
        for c in cuts:
            h = hs[c + 1]
            if kind == "recon":   # reconstruct the block's input
                dims.append((h[0].numel(), hs[start][0].numel()))
            else:
                dims.append((h.shape[-1] if h.dim() == 3 else h[0].numel(), n_out))
            start = c + 1
        return dims

    def block_weight(self, l: int) -> float:
        return 1.0 if l == self.num_blocks - 1 else self.module.weights[l]

    @property
    def num_blocks(self) -> int:
        return self.module.num_blocks

    def block_names(self, l: int) -> List[str]:
        return self.module.block_names(l)

    # pure functions (vmappable); ``params`` may hold only the entries a call reads
    def end_loss(self, params: Params, buffers: Params, batch: Batch) -> Tensor:
        """The task's own loss (heads unused): what ``local.meta=global`` scores."""
        return functional_call(self.module, {**params, **buffers}, tuple(batch), {"what": "end"})

    def block_inputs(self, params: Params, buffers: Params, x: Tensor) -> Tuple[Tensor, ...]:
        return functional_call(self.module, {**params, **buffers}, (x,), {"what": "inputs"})

    def block_loss(self, l: int, params: Params, buffers: Params, x_in: Tensor, y: Tensor) -> Tensor:
        return functional_call(self.module, {**params, **buffers}, (x_in, y),
                               {"what": "block", "block": l})

    def block_loss_out(self, l: int, params: Params, buffers: Params, x_in: Tensor,
                       y: Tensor) -> Tuple[Tensor, Tensor]:
        """(block l's local loss, block l's output) from its input ``x_in``."""
        return functional_call(self.module, {**params, **buffers}, (x_in, y),
                               {"what": "block_out", "block": l})

    def outputs(self, params: Params, x: Tensor, buffers: Optional[Params] = None) -> Tensor:
        return functional_call(self.module, {**params, **(self.buffers if buffers is None
                                                          else buffers)}, (x,))


class LocalFamily(TaskFamily):
    """Every task of ``base`` wrapped in :class:`LocalTask` with the given options."""

    def __init__(self, base: TaskFamily, layers=None, kind: str = "linear", weights=1.0,
                 inner: str = "local"):
        self.base, self.layers, self.kind, self.weights, self.inner = base, layers, kind, weights, inner
        self.name = getattr(base, "name", "family")

    def sample(self, generator: torch.Generator) -> LocalTask:
        return LocalTask(self.base.sample(generator), self.layers, self.kind, self.weights,
                         self.inner)

    def config(self) -> Dict[str, Any]:
        cfg = dict(self.base.config()) if hasattr(self.base, "config") else {}
        cfg["local"] = {"layers": None if self.layers is None else list(self.layers),
                        "kind": self.kind, "weights": self.weights, "inner": self.inner}
        return cfg
