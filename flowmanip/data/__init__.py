"""Demonstration data: ManiSkill and robomimic readers/writers, checks, training samples."""

from flowmanip.data.maniskill_io import DatasetMeta, Episode, read_maniskill
from flowmanip.data.robomimic_io import read_dataset, read_robomimic, write_robomimic

__all__ = ["DatasetMeta", "Episode", "read_maniskill", "read_robomimic", "read_dataset", "write_robomimic"]
