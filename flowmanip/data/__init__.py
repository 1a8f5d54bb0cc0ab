"""Demonstration data: ManiSkill and robomimic readers/writers, checks, training samples."""

from flowmanip.data.maniskill_io import DatasetMeta, Episode, read_maniskill
from flowmanip.data.robomimic_io import read_dataset, read_robomimic, write_robomimic
from flowmanip.errors import FlowmanipError


def load_demos(recipe):
    """Read the recipe's dataset and check it was recorded for the recipe's env/control/obs mode."""
    from flowmanip.data.validate import check_matches

    if recipe.data is None or not recipe.data.path:
        raise FlowmanipError("data.path: this stage needs a demonstration dataset")
    meta, episodes = read_dataset(recipe.data.path, recipe.data.max_episodes)
    check_matches(meta, episodes, env_id=recipe.env.id, control_mode=recipe.env.control_mode,
                  obs_mode=recipe.env.obs_mode, source=recipe.data.path)
    return meta, episodes


__all__ = ["load_demos", "DatasetMeta", "Episode", "read_maniskill", "read_robomimic", "read_dataset", "write_robomimic"]
