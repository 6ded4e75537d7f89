"""The errors tvmq raises for bad input. Each names what is wrong and where; the CLIs print
them as one line (no traceback) and exit with status 2."""
from __future__ import annotations

from deploy.boards import BoardStartError
from deploy.remote import BoardError
from deploy.runtime_build import BoardBuildError
from relay_passes import FloatOpError, LoweringError
from schedules.targets import UnknownTargetError
from schedules.tuning import TuningDatabaseError
from tvmq.conversion import AccumulatorOverflowError
from tvmq.data import DatasetError
from tvmq.qat import UnsupportedOpError
from tvmq.quantizers import ExponentRangeError, NonFiniteError
from tvmq.schemes.ternary import ZeroSpreadError
from tvmq.training import CalibrationError
from tvmq.schemes import UnknownSchemeError


class ModelFileError(ValueError):
    """A model file that is missing, unreadable or not a tvmq export."""


class ArtifactError(ValueError):
    """An artifact directory that cannot be written or read."""


class ToolchainError(RuntimeError):
    """A tool the build needs (the aarch64 cross compiler) is not installed."""


USER_ERRORS = (UnsupportedOpError, AccumulatorOverflowError, ExponentRangeError,
               UnknownSchemeError, UnknownTargetError, LoweringError, FloatOpError,
               ModelFileError, ArtifactError, ToolchainError, DatasetError,
               BoardError, BoardStartError, BoardBuildError, TuningDatabaseError,
               NonFiniteError, ZeroSpreadError, CalibrationError)
