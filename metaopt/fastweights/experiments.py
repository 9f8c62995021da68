"""Training loops for the fast-weight experiments and the ``metaopt-fastweights`` entry point.

    metaopt-fastweights retrieval --cores fastweights lstm rnn --hidden 20 50
    metaopt-fastweights capacity --rules sum delta learned --keys 20 100 120 --setting 2
    metaopt-fastweights plastic --task copy --models static hebbian gradient --seeds 0 1 2

Each run trains with Adam, evaluates on the validation split every ``eval_every`` steps, stops
early once the target is reached (or at ``max_steps`` / ``max_seconds``), and reports the test
metric of the best validation checkpoint. Results print as a table and can be written as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from metaopt.fastweights.models import CORES, CapacityModel, RetrievalModel
from metaopt.fastweights.plastic import PLASTIC_RULES, PlasticTransformer
from metaopt.fastweights.plastic_tasks import PLASTIC_TASKS, make_plastic_task
from metaopt.fastweights.rules import CHUNKWISE_RULES, WRITE_RULES
from metaopt.tasks.retrieval import capacity_batch, retrieval_splits


def _error(model, x, y, batch: int = 2000) -> float:
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            wrong += (model(x[i:i + batch]).argmax(-1) != y[i:i + batch]).sum().item()
    model.train()
    return wrong / len(x)


def train_retrieval(core: str = "fastweights", hidden: int = 20, num_pairs: int = 4,
                    lr: float = 1e-3, batch_size: int = 128, max_steps: int = 20000,
                    max_seconds: float = math.inf, eval_every: int = 500,
                    target_error: float = 0.0, seed: int = 0, data_seed: int = 0,
                    sizes: Optional[Dict[str, int]] = None, clip: float = 1.0,
                    cosine: bool = False, log=print, **core_kwargs) -> Dict[str, Any]:
    """Train one model on Ba et al.'s associative retrieval; returns a result row.
    ``cosine`` decays the learning rate to 0 over ``max_steps`` (cosine)."""
    data = retrieval_splits(num_pairs, data_seed, sizes)
    torch.manual_seed(seed)
    model = RetrievalModel(core, hidden, **core_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, max_steps) / max_steps)) if cosine
        else 1.0)
    g = torch.Generator().manual_seed(seed + 1)
    xtr, ytr = data["train"]
    best = (math.inf, None, 0)
    t0, step = time.perf_counter(), 0
    while step < max_steps and time.perf_counter() - t0 < max_seconds:
        idx = torch.randint(0, len(xtr), (batch_size,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        step += 1
        if step % eval_every == 0 or step == max_steps:
            err = _error(model, *data["valid"])
            if err < best[0]:
                best = (err, copy.deepcopy(model.state_dict()), step)
            log(f"[{core} R={hidden}] step {step} loss {loss.item():.4f} valid error "
                f"{100 * err:.2f}% ({time.perf_counter() - t0:.0f}s)")
            if err <= target_error:
                break
    seconds = time.perf_counter() - t0
    if best[1] is not None:
        model.load_state_dict(best[1])
    return {"task": "retrieval", "core": core, "hidden": hidden, "num_pairs": num_pairs,
            "test_error": _error(model, *data["test"]), "valid_error": best[0],
            "best_step": best[2], "steps": step, "seconds": round(seconds, 1), "lr": lr,
            "batch_size": batch_size, "seed": seed, "cosine": cosine,
            **{k: v for k, v in core_kwargs.items()}}


def train_capacity(rule: str = "delta", num_keys: int = 20, setting: int = 2, d_key: int = 64,
                   d_value: int = 8, lr: float = 3e-3, batch_size: int = 32,
                   max_steps: int = 5000, max_seconds: float = math.inf, eval_every: int = 250,
                   target_loss: float = 0.0, seed: int = 0, log=print,
                   init_rule: Optional[str] = None, save_rule: Optional[str] = None,
                   **model_kwargs) -> Dict[str, Any]:
    """Train one rule on Schlag et al.'s capacity task; returns a result row with the test MSE
    (fresh random bindings, 1024 sequences) of the best validation checkpoint.

    For the ``learned`` rule, ``init_rule`` starts the write network from a safetensors file
    (written by ``save_rule`` after an earlier run, e.g. at a smaller ``num_keys``); the
    embeddings and projections always start fresh."""
    torch.manual_seed(seed)
    model = CapacityModel(num_keys, rule, d_key=d_key, d_value=d_value, **model_kwargs)
    if init_rule:
        _load_write_net(model, init_rule)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    valid = capacity_batch(512, num_keys, d_value, setting, torch.Generator().manual_seed(10**6))
    test = capacity_batch(1024, num_keys, d_value, setting,
                          torch.Generator().manual_seed(10**6 + 1))

    def evaluate(batch):
        with torch.no_grad():
            return model.loss(batch).item()

    best = (math.inf, None, 0)
    t0, step = time.perf_counter(), 0
    while step < max_steps and time.perf_counter() - t0 < max_seconds:
        loss = model.loss(capacity_batch(batch_size, num_keys, d_value, setting, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0 or step == max_steps:
            val = evaluate(valid)
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()), step)
            log(f"[{rule} N={num_keys} setting {setting}] step {step} loss {loss.item():.2e} "
                f"valid {val:.2e} ({time.perf_counter() - t0:.0f}s)")
            if val <= target_loss:
                break
    seconds = time.perf_counter() - t0
    if best[1] is not None:
        model.load_state_dict(best[1])
    if save_rule:
        _save_write_net(model, save_rule)
    return {"task": "capacity", "rule": rule, "num_keys": num_keys, "setting": setting,
            "d_key": d_key, "d_value": d_value, "test_loss": evaluate(test),
            "valid_loss": best[0], "best_step": best[2], "steps": step,
            "seconds": round(seconds, 1), "lr": lr, "batch_size": batch_size, "seed": seed,
            "init_rule": init_rule, **model_kwargs}


#: the plastic comparison's default task sizes (sequences of 48, 32 and 10 tokens)
PLASTIC_TASK_DEFAULTS = {"copy": {"length": 16, "delay": 16, "n_symbols": 8, "random_delay": True},
                         "regression": {"n_points": 16, "dim": 4, "noise": 0.1},
                         "fewshot": {"n_way": 5, "k_shot": 1, "n_query": 5}}


def train_plastic(task: str = "copy", model: str = "hebbian", seed: int = 0, steps: int = 2000,
                  batch_size: int = 32, lr: float = 3e-3, warmup: int = 100, d_model: int = 32,
                  n_layers: int = 2, n_heads: int = 2, mlp_ratio: int = 2,
                  static_mlp_ratio: int = 4, eval_size: int = 1024, eval_every: int = 500,
                  clip: float = 1.0, task_kwargs: Optional[Dict[str, Any]] = None,
                  max_seconds: float = math.inf, save: Optional[str] = None, log=print,
                  **branch_kwargs) -> Dict[str, Any]:
    """Train one :class:`~metaopt.fastweights.plastic.PlasticTransformer` (``model``: static,
    hebbian or gradient) on a plastic task with Adam (linear warm-up, cosine decay, clipping);
    returns a result row with the final model's test figures on ``eval_size`` held-out sequences
    (the same ones for every model and seed; few-shot test episodes use held-out images).

    The static model gets ``static_mlp_ratio`` (default 4) so that its parameter count matches
    the plastic ones' (MLP ratio ``mlp_ratio`` plus the fast branch). ``save`` writes the
    trained weights (safetensors) and their config (JSON, ``save`` + ``.json``)."""
    kw = {**PLASTIC_TASK_DEFAULTS.get(task, {}), **(task_kwargs or {})}
    train_task = make_plastic_task(task, "train", **kw)
    test_task = make_plastic_task(task, "test", **kw)
    config = dict(rule=model, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                  max_len=train_task.seq_len,
                  mlp_ratio=static_mlp_ratio if model == "static" else mlp_ratio,
                  **train_task.io, **(branch_kwargs if model != "static" else {}))
    torch.manual_seed(seed)
    net = PlasticTransformer(**config)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup))
                                              * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed + 1)
    test = test_task.batch(eval_size, torch.Generator().manual_seed(10**6))

    def evaluate():
        net.eval()
        with torch.no_grad():
            m = test_task.metrics(net(test["x"]), test)
        net.train()
        return m

    t0, step = time.perf_counter(), 0
    while step < steps and time.perf_counter() - t0 < max_seconds:
        b = train_task.batch(batch_size, g)
        loss = train_task.loss(net(b["x"]), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
        step += 1
        if step % eval_every == 0 and step < steps:
            m = evaluate()
            log(f"[plastic {task} {model} seed {seed}] step {step} loss {loss.item():.4f} "
                + " ".join(f"test_{k} {v:.4f}" for k, v in m.items())
                + f" ({time.perf_counter() - t0:.0f}s)")
    seconds = time.perf_counter() - t0
    m = evaluate()
    log(f"[plastic {task} {model} seed {seed}] done: step {step} "
        + " ".join(f"test_{k} {v:.4f}" for k, v in m.items()) + f" ({seconds:.0f}s)")
    row = {"task": task, "model": model, "seed": seed, **{f"test_{k}": v for k, v in m.items()},
           "steps": step, "seconds": round(seconds, 1), "params": sum(p.numel() for p in net.parameters()),
           "lr": lr, "batch_size": batch_size, "d_model": d_model, "n_layers": n_layers,
           "mlp_ratio": config["mlp_ratio"], "task_kwargs": kw}
    if task == "regression":
        row["ridge_test_loss"] = test_task.least_squares_mse(test)["loss"]
    if save:
        save_plastic(net, config, kw, save)
    return row


def save_plastic(net: PlasticTransformer, config: Dict[str, Any], task_kwargs: Dict[str, Any],
                 path: str) -> None:
    """Write a plastic model: weights to ``path`` (safetensors), ``{"model": config, "task":
    task_kwargs}`` to ``path + ".json"``."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path)
    with open(path + ".json", "w") as f:
        json.dump({"model": config, "task": task_kwargs}, f, indent=1)


def load_plastic(path: str):
    """``(model, task_kwargs)`` from the files :func:`save_plastic` wrote (no unpickling)."""
    from safetensors.torch import load_file
    with open(path + ".json") as f:
        meta = json.load(f)
    net = PlasticTransformer(**meta["model"])
    net.load_state_dict(load_file(path))
    return net.eval(), meta["task"]


def summarize_plastic(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (task, model): mean and standard deviation (over seeds) of each test figure."""
    out = []
    keys = sorted({(r["task"], r["model"]) for r in rows},
                  key=lambda k: (PLASTIC_TASKS.index(k[0]) if k[0] in PLASTIC_TASKS else 99,
                                 PLASTIC_RULES.index(k[1])))
    for task, model in keys:
        rs = [r for r in rows if r["task"] == task and r["model"] == model]
        s = {"task": task, "model": model, "seeds": len(rs), "params": rs[0]["params"],
             "steps": rs[0]["steps"]}
        for k in [k for k in rs[0] if k.startswith("test_") or k == "ridge_test_loss"]:
            vals = torch.tensor([float(r[k]) for r in rs], dtype=torch.float64)
            s[k] = vals.mean().item()
            s[k + "_std"] = vals.std().item() if len(rs) > 1 else 0.0
        s["seconds"] = round(sum(r["seconds"] for r in rs) / len(rs), 1)
        out.append(s)
    return out


def plastic_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown tables, one per task: each model's test figures as ``mean +- std`` over seeds."""
    summary = summarize_plastic(rows)
    parts = []
    for task in dict.fromkeys(s["task"] for s in summary):
        ss = [s for s in summary if s["task"] == task]
        figs = [k for k in ss[0] if (k.startswith("test_") or k == "ridge_test_loss")
                and not k.endswith("_std")]
        table = [{"model": s["model"], "seeds": s["seeds"], "params": s["params"],
                  "steps": s["steps"],
                  **{k: f"{s[k]:.4f} +- {s[k + '_std']:.4f}" for k in figs},
                  "s/run": s["seconds"]} for s in ss]
        parts.append(f"### {task}\n\n" + format_table(table, list(table[0])))
    return "\n\n".join(parts)


def _write_net(model: CapacityModel):
    if model.fwp.write_net is None:
        raise ValueError(f"init_rule/save_rule need rule='learned' (got {model.fwp.rule!r})")
    return model.fwp.write_net


def _save_write_net(model: CapacityModel, path: str) -> None:
    from safetensors.torch import save_file
    net = _write_net(model)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path,
              metadata={"hidden": str(net.fc1.out_features)})


def _load_write_net(model: CapacityModel, path: str) -> None:
    from safetensors.torch import load_file
    net = _write_net(model)
    state = load_file(path)
    if {k: tuple(v.shape) for k, v in state.items()} != \
            {k: tuple(v.shape) for k, v in net.state_dict().items()}:
        raise ValueError(f"Invalid init_rule: {path!r} does not hold a write network of this size")
    net.load_state_dict(state)


def format_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4g}"
        return str(v)
    cells = [[c for c in columns]] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _save(rows, path):
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {path}")


def _mode(mode: str, rule: str) -> str:
    if mode == "auto":
        return "chunkwise" if rule in CHUNKWISE_RULES else "recurrent"
    return mode


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(
        prog="metaopt-fastweights", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fast-weight experiments: train fast-weight layers and baselines with Adam and print\n"
                    "a table (test metric of the best validation checkpoint).\n"
                    "  retrieval: Ba et al. associative retrieval (c9k8j3f1??c -> 9), test error\n"
                    "  plastic:   static vs Hebbian vs gradient-based plastic transformers on copy,\n"
                    "             in-context regression and few-shot digits, test loss per task\n"
                    "  capacity:  Schlag et al. key-value capacity, test MSE",
        epilog="examples:\n"
               "  metaopt-fastweights retrieval --cores fastweights lstm rnn --hidden 20 --max-steps 2000\n"
               "  metaopt-fastweights capacity --rules sum delta --keys 20 --max-steps 500\n"
               "  metaopt-fastweights plastic --task copy --model hebbian --seed 0 --steps 300")
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("retrieval", help="Ba et al. associative retrieval (error table)")
    r.add_argument("--cores", nargs="+", default=["fastweights", "lstm", "rnn"], choices=CORES,
        help="models to train: fastweights (Ba et al.), fwp (a FastWeightProgrammer), lstm, rnn")
    r.add_argument("--hidden", nargs="+", type=int, default=[20],
        help="hidden sizes R (one run per size and core)")
    r.add_argument("--num-pairs", type=int, default=4,
        help="key-value pairs per sequence (K)")
    r.add_argument("--lr", type=float, default=1e-3,
        help="Adam learning rate")
    r.add_argument("--batch-size", type=int, default=128,
        help="sequences per step")
    r.add_argument("--max-steps", type=int, default=20000,
        help="training steps at most")
    r.add_argument("--max-seconds", type=float, default=math.inf,
        help="wall-clock budget per run")
    r.add_argument("--eval-every", type=int, default=500,
        help="steps between validation evaluations")
    r.add_argument("--target-error", type=float, default=0.0,
        help="stop once the validation error is at most this")
    r.add_argument("--train-size", type=int, default=100_000,
        help="training sequences (valid 10,000, test 20,000)")
    r.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0")
    r.add_argument("--rule", default="delta", choices=WRITE_RULES, help="rule of the fwp core")
    r.add_argument("--form", default="attention", choices=["matrix", "attention"],
                   help="FastWeightRNN computation (equal results; attention is cheaper)")
    r.add_argument("--seed", type=int, default=0,
        help="seed of data and initialization")
    c = sub.add_parser("capacity", help="Schlag et al. capacity task (loss table)")
    c.add_argument("--rules", nargs="+", default=["sum", "delta", "learned"], choices=WRITE_RULES,
        help="write rules to compare")
    c.add_argument("--keys", nargs="+", type=int, default=[20, 100, 120],
        help="numbers of keys N (one run per N and rule)")
    c.add_argument("--setting", type=int, default=2, choices=[1, 2],
        help="1: each key written once; 2: each key written twice with fresh values")
    c.add_argument("--d-key", type=int, default=64,
        help="key embedding size")
    c.add_argument("--d-value", type=int, default=8,
        help="one-hot value size")
    c.add_argument("--feature-map", default="dpfp",
        help="key feature map: identity, elu1, dpfp")
    c.add_argument("--dpfp-nu", type=int, default=1,
        help="DPFP order nu")
    c.add_argument("--mode", default="auto", choices=["auto", "recurrent", "chunkwise"],
                   help="auto: chunkwise for sum/delta, recurrent for the others")
    c.add_argument("--lr", type=float, default=3e-3,
        help="Adam learning rate")
    c.add_argument("--batch-size", type=int, default=32,
        help="sequences per step")
    c.add_argument("--max-steps", type=int, default=5000,
        help="training steps at most")
    c.add_argument("--max-seconds", type=float, default=math.inf,
        help="wall-clock budget per run")
    c.add_argument("--eval-every", type=int, default=250,
        help="steps between validation evaluations")
    c.add_argument("--target-loss", type=float, default=0.0,
        help="stop once the validation MSE is at most this")
    c.add_argument("--seed", type=int, default=0,
        help="seed of data and initialization")
    c.add_argument("--ttt-mini-batch", type=int, default=16,
        help="ttt rule: writes per inner gradient step")
    c.add_argument("--init-rule", default=None, help="learned rule: start the write network "
                   "from this safetensors file")
    c.add_argument("--save-rule", default=None, help="learned rule: save the trained write "
                   "network here (safetensors)")
    pl = sub.add_parser("plastic", help="plastic transformers: static vs Hebbian vs gradient "
                        "(loss table, mean and spread over seeds)")
    pl.add_argument("--task", "--tasks", dest="tasks", nargs="+", default=["copy"],
                    choices=PLASTIC_TASKS, help="copy, regression (in-context linear), fewshot "
                    "(N-way K-shot digits)")
    pl.add_argument("--model", "--models", dest="models", nargs="+", default=list(PLASTIC_RULES),
                    choices=PLASTIC_RULES, help="static (no fast branch), hebbian, gradient")
    pl.add_argument("--seed", "--seeds", dest="seeds", nargs="+", type=int, default=[0],
                    help="seeds of initialization and training data (one run each)")
    pl.add_argument("--steps", type=int, default=2000, help="Adam steps per run")
    pl.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    pl.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay)")
    pl.add_argument("--d-model", type=int, default=32, help="transformer width")
    pl.add_argument("--n-layers", type=int, default=2, help="transformer blocks")
    pl.add_argument("--n-heads", type=int, default=2, help="attention heads (and fast-weight heads)")
    pl.add_argument("--eval-size", type=int, default=1024, help="held-out test sequences")
    pl.add_argument("--eval-every", type=int, default=500, help="steps between progress lines")
    pl.add_argument("--max-seconds", type=float, default=math.inf, help="wall-clock budget per run")
    pl.add_argument("--save-dir", default=None, help="write each trained model here "
                    "(<task>_<model>_seed<seed>.safetensors + .json)")
    pl.add_argument("--table", default=None, help="write the summary table (markdown) here")
    for s in (r, c, pl):
        s.add_argument("--threads", type=int, default=1,
            help="torch CPU threads")
        s.add_argument("--out", default=None, help="write the result rows as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    if a.task == "plastic":
        import os
        for task in a.tasks:
            for model in a.models:
                for seed in a.seeds:
                    save = None
                    if a.save_dir:
                        os.makedirs(a.save_dir, exist_ok=True)
                        save = os.path.join(a.save_dir, f"{task}_{model}_seed{seed}.safetensors")
                    rows.append(train_plastic(task, model, seed, a.steps, a.batch_size, a.lr,
                                              d_model=a.d_model, n_layers=a.n_layers,
                                              n_heads=a.n_heads, eval_size=a.eval_size,
                                              eval_every=a.eval_every, max_seconds=a.max_seconds,
                                              save=save))
                    _save(rows, a.out)
        table = plastic_table(rows)
        print(table)
        if a.table:
            with open(a.table, "w") as f:
                f.write(table + "\n")
            print(f"wrote {a.table}")
        return rows
    if a.task == "retrieval":
        sizes = {"train": a.train_size, "valid": 10_000, "test": 20_000}
        for hidden in a.hidden:
            for core in a.cores:
                kw = {"rule": a.rule} if core == "fwp" else {}
                if core == "fastweights":
                    kw = {"form": a.form}
                rows.append(train_retrieval(core, hidden, a.num_pairs, a.lr, a.batch_size,
                                            a.max_steps, a.max_seconds, a.eval_every,
                                            a.target_error, a.seed, sizes=sizes,
                                            cosine=a.cosine, **kw))
                rows[-1]["test_error_%"] = round(100 * rows[-1]["test_error"], 2)
                _save(rows, a.out)
        print(format_table(rows, ["core", "hidden", "test_error_%", "best_step", "steps",
                                  "seconds"]))
    else:
        for n in a.keys:
            for rule in a.rules:
                rows.append(train_capacity(rule, n, a.setting, a.d_key, a.d_value, a.lr,
                                           a.batch_size, a.max_steps, a.max_seconds,
                                           a.eval_every, a.target_loss, a.seed,
                                           init_rule=a.init_rule, save_rule=a.save_rule,
                                           feature_map=a.feature_map, dpfp_nu=a.dpfp_nu,
                                           mode=_mode(a.mode, rule),
                                           **({"ttt_mini_batch": a.ttt_mini_batch}
                                              if rule == "ttt" else {})))
                _save(rows, a.out)
        print(format_table(rows, ["rule", "num_keys", "setting", "test_loss", "best_step",
                                  "steps", "seconds"]))
    return rows


if __name__ == "__main__":
    main()
