"""JAX interop tests compile many small XLA programs once each: skip XLA's expensive backend
passes (it halves compile time on CPU; the numbers compared are the same ops). Only effective when
JAX's backend starts in this process after this file is read; harmless otherwise."""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
