"""``metaopt`` (also ``python -m metaopt``): one command with the four entry points as
subcommands.

    metaopt train  [hydra overrides]     meta-train a rule           (= metaopt-train)
    metaopt eval   [hydra overrides]     evaluate a rule / baselines (= metaopt-eval)
    metaopt report <sweep dir> [...]     compare the runs of a sweep (= metaopt-report)
    metaopt fastweights {retrieval,capacity} [...]  fast-weight experiments (= metaopt-fastweights)

Everything after the subcommand goes to that entry point unchanged, so ``metaopt train --help``
is ``metaopt-train --help``.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

#: subcommand -> (module, one-line description)
COMMANDS = {
    "train": ("metaopt.cli.train",
              "meta-train a learned update rule on a task family (hydra app; returns the "
              "final meta-loss)"),
    "eval": ("metaopt.cli.evaluate",
             "evaluate a trained rule against tuned SGD/Adam and other baselines on held-out "
             "tasks; --config-name=suite: speedup over lr-tuned Adam on the held-out suite"),
    "report": ("metaopt.cli.report",
               "compare the runs of a metaopt-train -m or metaopt-eval -m sweep: one table "
               "and figures"),
    "fastweights": ("metaopt.fastweights.experiments",
                    "fast-weight experiments: associative retrieval (Ba et al.) and key-value "
                    "capacity (Schlag et al.)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: metaopt <command> [args...]   (python -m metaopt <command> ...)", "",
             "Meta-learned optimizers and learned update rules for PyTorch.", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "'metaopt <command> --help' describes a command's options. Examples:",
              "  metaopt train meta.outer_steps=20 hydra.run.dir=runs/demo",
              "  metaopt eval checkpoint=runs/demo/checkpoints/last",
              "  metaopt report runs/sweep/<date>"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None):
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from metaopt import __version__
        print(f"metaopt {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"metaopt: unknown command {name!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(COMMANDS[name][0])
    if name == "report":                        # argparse entry points take argv
        return module.main(rest)
    if name == "fastweights":
        module.main(rest)
        return 0
    # hydra apps read sys.argv themselves
    sys.argv = [f"metaopt-{name}", *rest]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
