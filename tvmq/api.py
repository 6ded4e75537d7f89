"""The public API (DESIGN.md): prepare -> train/calibrate -> convert -> export -> build."""
from __future__ import annotations

from tvmq.artifact import Artifact, build, export, load_program
from tvmq.conversion import convert
from tvmq.qat import prepare
from tvmq.schemes import Recipe, get_recipe
from tvmq.training import calibrate, train

__all__ = ["prepare", "train", "calibrate", "convert", "export", "build", "load_program",
           "Artifact", "Recipe", "get_recipe"]
