"""Make demonstrations with ManiSkill's motion planners and convert them with ManiSkill's replay.

Both write ManiSkill's own ``.h5`` + ``.json`` format. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import subprocess
import sys
import tempfile

from flowmanip.errors import FlowmanipError

SOLVERS = {
    "PickCube-v1": "solvePickCube",
    "PushCube-v1": "solvePushCube",
    "StackCube-v1": "solveStackCube",
    "PegInsertionSide-v1": "solvePegInsertionSide",
    "PullCube-v1": "solvePullCube",
    "LiftPegUpright-v1": "solveLiftPegUpright",
    "PlugCharger-v1": "solvePlugCharger",
}


def _worker(env_id: str, seeds: list[int], quota: int, only_success: bool, out_dir: str, name: str, queue) -> None:
    """Runs in a spawned process: solve seeds in order until ``quota`` episodes are kept."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.examples.motionplanning.panda import solutions
    from mani_skill.utils.wrappers.record import RecordEpisode

    from flowmanip.envs.vector import render_kwargs

    solve = getattr(solutions, SOLVERS[env_id])
    env = gym.make(env_id, obs_mode="none", control_mode="pd_joint_pos", render_mode="rgb_array",
                   sim_backend="physx_cpu", **render_kwargs())
    env = RecordEpisode(env, output_dir=out_dir, trajectory_name=name, save_video=False,
                        source_type="motionplanning", source_desc="ManiSkill motion-planning solution (flowmanip)",
                        record_reward=False, save_on_reset=False)
    kept = 0
    for seed in seeds:
        if kept >= quota:
            break
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the planners print on failure
                result = solve(env, seed=seed, debug=False, vis=False)
        except Exception:  # a planner failure is an unsolved seed, not a crash
            result = -1
        success = result != -1 and bool(result[-1]["success"].item())
        if success or not only_success:
            env.flush_trajectory()
            kept += 1
        else:
            env.flush_trajectory(save=False)
        queue.put((1, int(success)))
    env.close()
    queue.put(("done", kept))


def generate_demos(env_id: str, out_path: str, num: int, seed_start: int = 0, workers: int = 1,
                   only_success: bool = True, max_attempts_factor: int = 4) -> dict:
    """Write ``num`` motion-planning demos of ``env_id`` (``pd_joint_pos``, no obs) to ``out_path`` (.h5).

    Worker ``i`` tries seeds ``seed_start + i, seed_start + i + workers, ...``. With
    ``only_success`` failed plans are dropped and more seeds are tried, up to
    ``max_attempts_factor * num`` in all. Returns counts.
    """
    from tqdm import tqdm

    if env_id not in SOLVERS:
        raise FlowmanipError(f"no motion-planning solution for {env_id!r}; choose one of {sorted(SOLVERS)}")
    if not out_path.endswith(".h5"):
        raise FlowmanipError(f"{out_path}: output must end in .h5 (ManiSkill format)")
    if num < 1 or workers < 1:
        raise FlowmanipError(f"num ({num}) and workers ({workers}) must be >= 1")
    workers = min(workers, num)
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-demos-", dir=os.path.dirname(out_path))
    max_attempts = max_attempts_factor * num
    quotas = [num // workers + (i < num % workers) for i in range(workers)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    try:
        for i in range(workers):
            seeds = list(range(seed_start + i, seed_start + max_attempts, workers))
            p = ctx.Process(target=_worker, args=(env_id, seeds, quotas[i], only_success, tmp_dir, f"part{i}", queue))
            p.start()
            procs.append(p)
        attempts = solved = 0
        finished, kept = 0, 0
        with tqdm(total=num, desc=f"{env_id} demos", unit="demo", dynamic_ncols=True) as bar:
            idle = 0
            while finished < workers:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if crashed:  # e.g. a segfault in the planner (mplib with numpy 2): say so at once
                    raise FlowmanipError(f"a demo worker for {env_id} crashed (exit code {crashed[0]})")
                try:
                    kind, value = queue.get(timeout=5)
                except queue_module.Empty:
                    idle += 5
                    if idle >= 600:
                        raise FlowmanipError(f"demo generation for {env_id} stalled (no progress for 10 minutes)")
                    continue
                idle = 0
                if kind == "done":
                    finished += 1
                    kept += value
                    continue
                attempts += 1
                solved += value
                if value or not only_success:
                    bar.update(1)
                bar.set_postfix(solved=f"{solved}/{attempts}")
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise FlowmanipError(f"a demo worker for {env_id} crashed (exit code {p.exitcode})")
        if kept < num:
            raise FlowmanipError(
                f"only {kept}/{num} {env_id} demos succeeded within {max_attempts} seeds; "
                "raise max_attempts_factor or lower num")
        parts = [os.path.join(tmp_dir, f"part{i}.h5") for i in range(workers)]
        from mani_skill.trajectory.merge_trajectory import merge_trajectories

        merged = os.path.join(tmp_dir, "merged.h5")
        with contextlib.redirect_stdout(io.StringIO()):
            merge_trajectories(merged, parts)
        os.replace(merged, out_path)
        os.replace(merged[:-3] + ".json", out_path[:-3] + ".json")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"env_id": env_id, "kept": kept, "attempts": attempts, "solved": solved, "path": out_path}


def failure_reason(output: str) -> str:
    """The lines of a failed tool's output that say why: its last error line, not its progress bars."""
    lines = [ln.strip() for ln in output.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and not ("%|" in ln or "/s]" in ln or ln.startswith("warn"))]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "Exception" in ln]
    return " | ".join(errors[-1:] if errors else lines[-3:]) or "no output"


def replay_convert(src: str, out_path: str, control_mode: str, obs_mode: str = "state",
                   reward_mode: str | None = "normalized_dense", workers: int = 1,
                   camera_size: int | None = None, count: int | None = None) -> dict:
    """Convert control mode and/or obs mode through ManiSkill's own replay tool.

    Runs ``python -m mani_skill.trajectory.replay_trajectory`` on ``src`` (a ManiSkill
    ``.h5``), records rewards in ``reward_mode``, keeps only episodes that still succeed
    after conversion, and moves the result to ``out_path`` (``.h5`` + ``.json``).
    ``camera_size`` sets the cameras' width/height for image obs modes.
    """
    from flowmanip.data.maniskill_io import json_path_for, read_maniskill_meta

    if not src.endswith(".h5"):
        raise FlowmanipError(f"{src}: replay reads a ManiSkill .h5 (with its .json beside it), not a "
                             f"{os.path.splitext(src)[1] or 'extension-less'} file")
    meta, info = read_maniskill_meta(src)
    if not out_path.endswith(".h5"):
        raise FlowmanipError(f"{out_path}: output must end in .h5 (ManiSkill format)")
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-convert-", dir=os.path.dirname(out_path))
    try:
        # replay writes next to its input, so work on a copy in a private directory
        src_copy = os.path.join(tmp_dir, "source.h5")
        os.symlink(os.path.abspath(src), src_copy)
        if camera_size:
            info["env_info"].setdefault("env_kwargs", {})["sensor_configs"] = {"width": camera_size, "height": camera_size}
        with open(json_path_for(src_copy), "w") as f:
            json.dump(info, f)
        cmd = [sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", src_copy,
               "--use-first-env-state", "-c", control_mode, "-o", obs_mode, "--save-traj", "-b", "physx_cpu",
               "-n", str(workers)]
        if reward_mode:
            cmd += ["--record-rewards", "--reward-mode", reward_mode]
        if count:
            cmd += ["--count", str(count)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_dir)
        produced = os.path.join(tmp_dir, f"source.{obs_mode}.{control_mode}.physx_cpu.h5")
        if proc.returncode != 0 or not os.path.exists(produced):
            raise FlowmanipError(f"{src}: ManiSkill replay to {control_mode}/{obs_mode} failed: "
                                 f"{failure_reason(proc.stderr + chr(10) + proc.stdout)}")
        with open(json_path_for(produced)) as f:
            converted = len(json.load(f)["episodes"])
        if converted == 0:  # nothing worth writing: leave out_path as it was
            raise FlowmanipError(f"{src}: no episode survived conversion to {control_mode}/{obs_mode} "
                                 "(ManiSkill's replay keeps only episodes that still succeed)")
        os.replace(produced, out_path)
        os.replace(json_path_for(produced), json_path_for(out_path))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    total = count or len(info["episodes"])
    return {"source": src, "path": out_path, "episodes_in": total, "episodes_out": converted,
            "from_control_mode": meta.control_mode, "control_mode": control_mode, "obs_mode": obs_mode}
