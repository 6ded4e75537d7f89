"""tvmq: quantization-aware-trained PyTorch CNNs compiled by Apache TVM into integer-only,
bit-exact kernels for edge CPUs (Raspberry Pi / x86).

>>> qat = tvmq.prepare(model, "int-se")      # doctest: +SKIP
>>> tvmq.train(qat, loader)                  # or your own loop; tvmq.calibrate for PTQ
>>> deploy = tvmq.convert(qat)               # the PyTorch integer reference
>>> art = tvmq.build(deploy, example, target="arm", out="build/arm")
"""
import tvmq.ops  # noqa: F401  registers the tvmq:: custom ops
from tvmq.api import (Artifact, Recipe, build, calibrate, convert, export, get_recipe,
                      load_program, prepare, train)
from tvmq.errors import USER_ERRORS

__version__ = "0.1.0"
import tvmq.deploy  # noqa: E402,F401  tvmq.deploy.run
