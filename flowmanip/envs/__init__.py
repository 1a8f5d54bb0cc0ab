"""ManiSkill environments: GPU-parallel (physx_cuda) or CPU worker processes, one interface.

Both step *action chunks*: ``step_chunk(actions [N, h, A])`` executes up to ``h`` env
steps per env and returns the discounted reward sum over the steps actually taken, so
SAC Flow sees the chunk-level MDP of docs/design.md (``y = sum_i gamma^i r_{t+i} + gamma^n ...``).
"""

from flowmanip.envs.vector import ChunkResult, make_vector_env, resolve_backend

__all__ = ["ChunkResult", "make_vector_env", "resolve_backend"]
