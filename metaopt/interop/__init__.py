"""Adapters: ``metaopt.interop.torchopt`` (rules as torchopt transforms and back) and
``metaopt.interop.higher`` (LearnedOptimizer inside ``higher.innerloop_ctx``). Import the
submodule you need; nothing is imported here."""
