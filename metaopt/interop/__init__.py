"""Adapters: ``metaopt.interop.torchopt`` (rules as torchopt transforms and back) and
``metaopt.interop.higher`` (LearnedOptimizer inside ``higher.innerloop_ctx``). Import the
submodule you need; nothing is imported here."""

__all__: list = []   # the adapters are submodules: metaopt.interop.torchopt, .higher, .implicit
