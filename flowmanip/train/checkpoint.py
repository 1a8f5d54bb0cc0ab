"""Self-describing, atomically written checkpoints that are safe to open.

``<stage_dir>/checkpoints/<step>/`` holds

- ``model.safetensors``: every weight set (``policy``, ``policy_ema``, ``agent``, ...) as plain tensors,
  keyed ``<set>/<parameter>``; the sets and their key order are in the file's header;
- ``config.yaml``: the resolved recipe; ``spec.json``: normalisers, action bounds and dims;
  ``meta.json``: env id, control mode, stage, step, version (for people and for the checks on load);
- ``training_state.pt`` (what ``--resume`` needs: optimisers, LR schedule, counters, RNG states, the replay
  buffer): tensors and plain data only, read with ``torch.load(weights_only=True)``.

Nothing in a checkpoint is unpickled into arbitrary objects, so opening one cannot run code.
``checkpoints/last`` is a symlink to the newest one. Checkpoints of earlier versions (one pickled
``policy.pt``) are refused; ``flowmanip convert-checkpoint`` (:func:`convert_checkpoint`) rewrites them.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import random
import shutil
import sys

import numpy as np
import torch

from flowmanip import __version__
from flowmanip.config import FROZEN_FLOW_ACTORS, from_dict, upgrade_checkpoint_config, to_yaml
from flowmanip.errors import FlowmanipError
from flowmanip.spec import check_spec
from flowmanip.utils import atomic_output

FORMAT = 2  # 1 (earlier versions): one pickled policy.pt (+ a pickled training_state.pt)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
SPEC_FILE = "spec.json"
META_FILE = "meta.json"
STATE_FILE = "training_state.pt"
LEGACY_FILE = "policy.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, SPEC_FILE, META_FILE, STATE_FILE)


# --- RNG states as plain data ---------------------------------------------------------------------

def _plain_rng(state: dict) -> dict:
    """RNG states as lists, numbers and tensors (``torch.load(weights_only=True)`` reads those); accepts the
    tuples of ``random.getstate`` / ``np.random.get_state`` too (training states of earlier versions)."""
    py, nps = state["python"], state["numpy"]
    if not isinstance(py, dict):
        py = {"version": int(py[0]), "internal": [int(x) for x in py[1]], "gauss_next": py[2]}
    if not isinstance(nps, dict):
        nps = {"bit_generator": str(nps[0]), "key": torch.from_numpy(np.asarray(nps[1]).astype(np.int64)),
               "pos": int(nps[2]), "has_gauss": int(nps[3]), "cached_gaussian": float(nps[4])}
    return {"python": py, "numpy": nps, "torch": state["torch"]}


def rng_state() -> dict:
    return _plain_rng({"python": random.getstate(), "numpy": np.random.get_state(legacy=True),
                       "torch": torch.get_rng_state()})


def set_rng_state(state: dict) -> None:
    state = _plain_rng(state)
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    key = nps["key"].numpy() if isinstance(nps["key"], torch.Tensor) else np.asarray(nps["key"])
    np.random.set_state((nps["bit_generator"], key.astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def _plain(obj, where: str = "training_state"):
    """``obj`` as what ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, None, and
    dicts, lists and tuples of them. NumPy arrays become tensors and NumPy scalars Python numbers; anything
    else is a bug in the caller (it could only be read back by unpickling), said before anything is written."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "u" and obj.dtype.itemsize > 1:  # torch's uint16/32/64 support is partial
            obj = obj.astype(np.int64)
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: a NumPy array of dtype {obj.dtype} is not plain data")
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not a str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data (tensors, "
                    "numbers, strings, None, dicts, lists, tuples); a checkpoint must not need unpickling")


# --- writing ----------------------------------------------------------------------------------------

def _weights_tensors(weights: dict) -> tuple[dict, dict]:
    """Flatten ``{set: state_dict}`` to ``{"set/key": tensor}`` plus the header's record of the sets."""
    tensors, sets = {}, {}
    for name, state_dict in weights.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"weights: set name {name!r} must be a non-empty string without '/'")
        sets[name] = []
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"weights[{name!r}][{key!r}] is a {type(value).__name__}, not a tensor")
            # a copy of each: state dicts share storage (the agent's holds the policy's parameters), and
            # safetensors stores every tensor on its own
            tensors[f"{name}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
            sets[name].append(key)
    return tensors, sets


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _write_checkpoint(directory: str, meta: dict, spec: dict, recipe, weights: dict,
                      training_state: dict | None) -> None:
    """The weights file goes last: its header records the other files (the text files' SHA-256, the training
    state's size), so that a truncated or edited file is found when the checkpoint is read."""
    from safetensors.torch import save_file

    tensors, sets = _weights_tensors(weights)  # before anything is written: weights that are not tensors
    state = _plain(training_state) if training_state is not None else None
    files = {}
    spec_text = json.dumps(spec, indent=1, default=_json_default)
    check_spec(json.loads(spec_text), os.path.join(directory, SPEC_FILE))  # what is written must load again
    texts = {CONFIG_FILE: to_yaml(recipe), SPEC_FILE: spec_text, META_FILE: json.dumps(meta, indent=2)}
    for name, text in texts.items():
        data = text.encode()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        files[name] = {"bytes": len(data), "sha256": _sha256(data)}
    if state is not None:
        torch.save(state, os.path.join(directory, STATE_FILE))
        files[STATE_FILE] = {"bytes": os.path.getsize(os.path.join(directory, STATE_FILE))}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE),
              metadata={"format": f"flowmanip-checkpoint/{FORMAT}", "sets": json.dumps(sets),
                        "files": json.dumps(files)})


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"spec: a {type(obj).__name__} is not JSON data")


def _point_last(ckpt_root: str, target: str) -> None:
    link = os.path.join(ckpt_root, "last")
    tmp_link = link + ".tmp"
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(target, tmp_link)
    os.replace(tmp_link, link)  # atomic: `last` is always the old or the new checkpoint


def _remove_leftovers(ckpt_root: str) -> None:
    """Temporary directories of writes that were killed (atomic_output's ``.tmp-*``, our ``.prev-*``)."""
    if not os.path.isdir(ckpt_root):
        return
    last = os.path.realpath(os.path.join(ckpt_root, "last"))
    for name in os.listdir(ckpt_root):
        full = os.path.join(ckpt_root, name)
        if name.startswith((".tmp-", ".prev-")) and not (last + os.sep).startswith(os.path.realpath(full) + os.sep):
            shutil.rmtree(full, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def save_checkpoint(stage_dir: str, step: int, recipe, spec: dict, weights: dict, training_state: dict | None,
                    stage: str, extra_meta: dict | None = None) -> str:
    ckpt_root = os.path.join(stage_dir, "checkpoints")
    path = os.path.join(ckpt_root, str(step))
    meta = {
        "flowmanip_version": __version__, "checkpoint_format": FORMAT, "stage": stage, "step": int(step),
        "env_id": recipe.env.id, "control_mode": recipe.env.control_mode, "obs_mode": recipe.env.obs_mode,
        "reward_mode": recipe.env.reward_mode, "max_episode_steps": recipe.env.max_episode_steps,
        "velocity": recipe.policy.velocity,
        # residual and noise-steering recipes pretrain a plain flow policy
        "actor": "flow" if stage == "pretrain" and recipe.policy.actor in FROZEN_FLOW_ACTORS else recipe.policy.actor,
        "flow_steps": recipe.policy.flow_steps, "chunk": recipe.policy.chunk,
        "obs_dim": spec["obs_dim"], "rgb_shape": spec["rgb_shape"], "action_dim": spec["action_dim"],
        **(extra_meta or {}),
    }
    _remove_leftovers(ckpt_root)
    kept = None
    with atomic_output(path, replace_dir=True) as tmp:
        os.makedirs(tmp)
        _write_checkpoint(tmp, meta, spec, recipe, weights, training_state)
        if os.path.isdir(path) and os.path.realpath(os.path.join(ckpt_root, "last")) == os.path.realpath(path):
            # the step `last` points at is saved again (the final save of a run that just saved): atomic_output
            # removes it before moving the new one in, so point `last` at a hard-linked copy meanwhile
            kept = os.path.join(ckpt_root, f".prev-{step}")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(path, kept, copy_function=_link_or_copy)
            _point_last(ckpt_root, os.path.basename(kept))
    _point_last(ckpt_root, str(step))
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)
    return path


# --- reading ----------------------------------------------------------------------------------------

def _convert_hint(path: str) -> str:
    return (f"if you trust where it came from, convert it with `flowmanip convert-checkpoint {path} NEW_DIR` "
            "and use NEW_DIR")


def _legacy_error(directory: str) -> FlowmanipError:
    legacy = os.path.join(directory, LEGACY_FILE)
    if _is_torchscript(legacy):
        return FlowmanipError(f"{legacy}: is an exported policy (TorchScript), not a training checkpoint; "
                              "give the checkpoint directory it was exported from")
    return FlowmanipError(f"{legacy}: a checkpoint in the format of earlier flowmanip versions (a pickle, which "
                          f"can run code when opened), so it is not opened; {_convert_hint(directory)}")


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint dir or a file in it, a stage dir (…/pretrain), or a run dir (its finetune
    stage when it has one, else its pretrain stage). A checkpoint of an earlier version (a pickled
    ``policy.pt``) is refused with how to convert it, without opening it."""
    if os.path.isfile(path):
        if _is_torchscript(path):
            raise FlowmanipError(f"{path}: is an exported policy (TorchScript), not a training checkpoint; "
                                 "give the checkpoint directory it was exported from")
        if os.path.basename(path) not in (*CHECKPOINT_FILES, LEGACY_FILE):
            raise FlowmanipError(f"{path}: is a file; expected a checkpoint directory "
                                 "(e.g. runs/pickcube/pretrain/checkpoints/last)")
        path = os.path.dirname(path) or "."
    candidates = [path, os.path.join(path, "checkpoints", "last")]
    for stage in ("finetune", "pretrain"):
        candidates.append(os.path.join(path, stage, "checkpoints", "last"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, WEIGHTS_FILE)):
            return os.path.realpath(c)
        if os.path.isfile(os.path.join(c, LEGACY_FILE)):
            raise _legacy_error(os.path.realpath(c))
    raise FlowmanipError(f"{path}: no checkpoint found (expected a directory with {WEIGHTS_FILE}, "
                         "e.g. runs/pickcube/pretrain/checkpoints/last)")


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with compiled code in it; a torch.save file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _unreadable(file: str, e: Exception, what: str = "checkpoint") -> FlowmanipError:
    return FlowmanipError(f"{file}: cannot load {what} ({type(e).__name__}: {_first_line(e)}; truncated or corrupt?)")


def _mismatch(data_size: int, digest: str | None, record: dict | None) -> str | None:
    """Why a file is not the one the checkpoint's weights header recorded (None: it is, or none was recorded)."""
    if record is None:
        return None
    if record.get("bytes") != data_size:
        return f"{data_size} bytes, {record.get('bytes')} when the checkpoint was written; truncated or replaced?"
    if "sha256" in record and record["sha256"] != digest:
        return "its contents changed since the checkpoint was written (SHA-256 recorded in model.safetensors); " \
               "corrupt or edited?"
    return None


def _read_text_file(directory: str, name: str, parse, files: dict):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
        raise FlowmanipError(f"{file}: missing; {directory} is not a complete checkpoint")
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _unreadable(file, e) from None
    reason = _mismatch(len(data), _sha256(data), files.get(name))
    if reason:
        raise FlowmanipError(f"{file}: cannot load checkpoint ({reason})")
    try:
        value = parse(data.decode())
    except Exception as e:
        raise _unreadable(file, e) from None
    if not isinstance(value, dict):
        raise FlowmanipError(f"{file}: not a mapping; corrupt checkpoint")
    return value


def _read_weights(file: str) -> tuple[dict, dict]:
    """``{set: state_dict}`` from a checkpoint's ``model.safetensors`` (tensors only: nothing is unpickled),
    and its record of the checkpoint's other files."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if not header.get("format", "").startswith("flowmanip-checkpoint/"):
                raise ValueError("no flowmanip checkpoint header")
            sets = json.loads(header["sets"])
            weights = {name: collections.OrderedDict((key, f.get_tensor(f"{name}/{key}")) for key in keys)
                       for name, keys in sets.items()}
            return weights, json.loads(header.get("files", "{}"))
    except Exception as e:
        raise _unreadable(file, e, "weights") from None


def _compat_config(config: dict) -> dict:
    """Settings added after a checkpoint was written take the values that reproduce its weights."""
    return upgrade_checkpoint_config(config)


def _recipe_from_config(config: dict, source: str):
    try:
        return from_dict(config)
    except Exception as e:
        raise FlowmanipError(f"{source}: not a recipe this flowmanip reads ({type(e).__name__}: "
                             f"{_first_line(e)})") from None


def load_training_state(file: str, record: dict | None = None) -> dict:
    """A checkpoint's training state, read with ``torch.load(weights_only=True)``."""
    reason = _mismatch(os.path.getsize(file), None, record)
    if reason:
        raise FlowmanipError(f"{file}: cannot load training state ({reason}), cannot resume from it")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = ("it holds objects other than tensors and plain data, which only unpickling could make (a file "
                  "of an earlier flowmanip, or one tampered with); not opened" if "Weights only load failed" in str(e)
                  else f"{type(e).__name__}: {_first_line(e)}; truncated or corrupt?")
        raise FlowmanipError(f"{file}: cannot load training state ({reason}), cannot resume from it") from None
    except Exception as e:
        raise FlowmanipError(f"{file}: cannot load training state ({type(e).__name__}: {_first_line(e)}; "
                             "truncated or corrupt?), cannot resume from it") from None


def load_checkpoint(path: str, with_training_state: bool = False) -> dict:
    import yaml

    path = resolve_checkpoint(path)
    weights, files = _read_weights(os.path.join(path, WEIGHTS_FILE))
    meta = _read_text_file(path, META_FILE, json.loads, files)
    spec = check_spec(_read_text_file(path, SPEC_FILE, json.loads, files), os.path.join(path, SPEC_FILE))
    config = _compat_config(_read_text_file(path, CONFIG_FILE, yaml.safe_load, files))
    ckpt = {"meta": meta, "spec": spec, "config": config,
            "recipe": _recipe_from_config(config, os.path.join(path, CONFIG_FILE)), "weights": weights, "path": path}
    if with_training_state:
        ts = os.path.join(path, STATE_FILE)
        if not os.path.isfile(ts):
            raise FlowmanipError(f"{path}: has no {STATE_FILE}, cannot resume from it")
        ckpt["training_state"] = load_training_state(ts, files.get(STATE_FILE))
    return ckpt


# --- checkpoints of earlier versions ------------------------------------------------------------------

def _numpy_globals() -> list:
    """What a pickled NumPy array needs (earlier training states hold NumPy's RNG state): safe to allow."""
    try:
        from numpy.core.multiarray import _reconstruct
    except ImportError:  # NumPy 2
        from numpy._core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]  # numpy.dtypes.* classes (NumPy >= 1.25)
    return allowed


def _load_legacy_file(file: str, trust: bool):
    """Open a torch.save file of an earlier version: first as plain data (tensors, NumPy arrays, numbers);
    only with ``trust`` by unpickling, which runs whatever code the file asks for (warned on stderr)."""
    import contextlib

    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow(_numpy_globals()) if allow else contextlib.nullcontext():
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _unreadable(file, e) from None
    except Exception as e:
        raise _unreadable(file, e) from None
    if not trust:
        raise FlowmanipError(f"{file}: holds objects other than tensors and plain data, which only unpickling "
                             "could make, and unpickling runs any code the file contains; not opened. If you "
                             "trust where it came from, add --trust")
    print(f"flowmanip: warning: unpickling {file} (torch.load weights_only=False) because of --trust: this "
          "runs any code the file contains", file=sys.stderr)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _unreadable(file, e) from None


def convert_checkpoint(old: str, new: str, trust: bool = False) -> str:
    """Rewrite a checkpoint of an earlier version (``policy.pt`` [+ ``training_state.pt``], pickles) as a
    directory in this version's format at ``new`` (which must not exist). Returns ``new``."""
    directory = old
    if os.path.isfile(old):
        directory = os.path.dirname(old) or "."
    legacy = os.path.join(directory, LEGACY_FILE)
    if os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        raise FlowmanipError(f"{directory}: is already a checkpoint in the current format; nothing to convert")
    if not os.path.isfile(legacy):
        raise FlowmanipError(f"{old}: no {LEGACY_FILE} there; give the directory of a checkpoint written by an "
                             "earlier flowmanip (…/checkpoints/<step>)")
    if _is_torchscript(legacy):
        raise FlowmanipError(f"{legacy}: is an exported policy (TorchScript), not a training checkpoint")
    if os.path.lexists(new):
        raise FlowmanipError(f"{new}: already exists; give a new directory for the converted checkpoint")
    ckpt = _load_legacy_file(legacy, trust)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("meta", "spec", "config", "weights")):
        raise FlowmanipError(f"{legacy}: not a flowmanip checkpoint (no meta, spec, config and weights in it)")
    config = _compat_config(ckpt["config"])
    recipe = _recipe_from_config(config, legacy)
    state = None
    state_file = os.path.join(directory, STATE_FILE)
    if os.path.isfile(state_file):
        state = _load_legacy_file(state_file, trust)
        try:
            if isinstance(state, dict) and isinstance(state.get("rng"), dict):
                state["rng"] = _plain_rng(state["rng"])
            state = _plain(state)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise FlowmanipError(f"{state_file}: cannot convert ({e})") from None
    meta = {**ckpt["meta"], "checkpoint_format": FORMAT, "converted_from": os.path.realpath(legacy)}
    try:
        with atomic_output(new, replace_dir=False) as tmp:
            os.makedirs(tmp)
            _write_checkpoint(tmp, meta, ckpt["spec"], recipe, ckpt["weights"], state)
    except (TypeError, ValueError) as e:  # weights or state that are not tensors and plain data
        raise FlowmanipError(f"{legacy}: cannot convert ({e})") from None
    return new


def architecture_keys(policy_cfg, actor: str, rgb: bool) -> list[str]:
    """The policy settings that shape the weights an init checkpoint must load into (settings the
    network does not use, such as Flow-T's for a Flow-G checkpoint, may differ)."""
    keys = ["velocity", "sigma_mode"]
    if actor == "gaussian" or policy_cfg.velocity != "decoded":
        keys += ["hidden_dim", "num_layers"]
    else:
        keys += ["decoder_layers", "decoder_heads", "decoder_dim", "decoder_tokens", "decoder_memory_tokens"]
    if rgb:
        keys += ["cnn_channels", "cnn_head", "encoder_dim"]
    else:
        keys += ["encoder"] + (["encoder_dim"] if policy_cfg.encoder != "identity" else [])
    return keys


def check_init_matches(meta: dict, recipe, source: str, obs_dim: int | None, init_policy,
                       what: str = "init checkpoint") -> None:
    """A checkpoint to start from (``what``: an init checkpoint, or the run to resume) must be for the
    same env, control mode, obs mode, action chunk, actor and network shapes as the recipe."""
    for key, name, want in (("env_id", "env.id", recipe.env.id),
                            ("control_mode", "env.control_mode", recipe.env.control_mode),
                            ("obs_mode", "env.obs_mode", recipe.env.obs_mode),
                            ("chunk", "policy.chunk", recipe.policy.chunk),
                            ("actor", "policy.actor", recipe.policy.actor)):
        have = meta.get(key, "flow" if key == "actor" else None)  # checkpoints before the Gaussian baseline
        if key == "actor" and what == "init checkpoint" and want in FROZEN_FLOW_ACTORS:
            want = "flow"  # residual and noise-steering actors start from a (frozen) flow policy
        if have != want:
            raise FlowmanipError(f"{source}: {what} has {name}={have!r}, the recipe wants {want!r}")
    for key in architecture_keys(init_policy, meta.get("actor", "flow"), bool(meta.get("rgb_shape"))):
        have, want = getattr(init_policy, key), getattr(recipe.policy, key)
        if have != want:
            raise FlowmanipError(f"{source}: {what} has policy.{key}={have!r}, the recipe wants {want!r} "
                                 f"(set policy.{key}={have} to use it)")
    if obs_dim is not None and meta["obs_dim"] != obs_dim:
        raise FlowmanipError(f"{source}: {what} expects obs_dim {meta['obs_dim']}, the data has {obs_dim}")
