"""A training run's workdir: its layout, and reading what it trained back as towers.

    WORKDIR/config.json       the resolved config (written at every start)
    WORKDIR/models/ROLE/      the Hugging Face config and tokenizer files each tower started
                              from (copied at the first start: export and the refresher need
                              neither the hub nor the bucket it came from); models.json says
                              which parameter group each role reads and its max length
    WORKDIR/checkpoints/N/    Orbax checkpoints (state: params by group, optimizer, step, rng;
                              record: data position, index version)
    WORKDIR/best/N/           the best evaluation's checkpoint (its record: metric, value)
    WORKDIR/index/vNNNNNN/    index versions; WORKDIR/corpus_store/ the run's own store
    WORKDIR/refresher.json, finished.json   the async refresher's heartbeat; the run is over

Both the trainer and the refresher import this module; it imports only core, config and models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from art_jax.config import read_run_config
from art_jax.core import storage
from art_jax.core.checkpoints import SKIP, Checkpoints
from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json
from art_jax.core.remote import local_copy
from art_jax.core.sharding import make_mesh
from art_jax.models.bert import Bert
from art_jax.models.export import check_max_lengths, export_retriever, reads_as_export, tower_path
from art_jax.models.hf import (
    abstract_module,
    bert_config_from_hf,
    load_tokenizer,
    read_config,
    resolve_checkpoint,
    t5_config_from_hf,
    write_json,
)
from art_jax.models.reader_folder import (
    READER_FILE,
    Reader,
    ReaderSettings,
    holds_reader,
    read_reader_folder,
    read_settings,
    reader_folder_of,
    reader_path,
    settings_record,
)
from art_jax.models.t5 import T5

CONFIG, CHECKPOINTS, BEST, INDEX, CORPUS_STORE = "config.json", "checkpoints", "best", "index", "corpus_store"
HEARTBEAT, FINISHED, MODELS = "refresher.json", "finished.json", "models"
ROLES = ("question", "passage")  # the towers'
# the reader's role (and group); a Joint top-K run's trained cross-attention weight lambda is the group JOINT
READER, JOINT = "reader", "joint"


def is_run(path: str) -> bool:
    return storage.isfile(os.path.join(path, CONFIG)) and storage.isdir(os.path.join(path, CHECKPOINTS))


def run_root(spec: str) -> str | None:
    """The run workdir that ``spec`` is, or holds as one of its checkpoints (WORKDIR/checkpoints/N,
    WORKDIR/best, WORKDIR/best/N); None when it is neither."""
    spec = spec.rstrip("/")
    parent, name = os.path.dirname(spec), os.path.basename(spec)
    if is_run(spec):
        return spec
    if name == BEST and is_run(parent):
        return parent
    if name.isdigit() and os.path.basename(parent) in (CHECKPOINTS, BEST) and is_run(os.path.dirname(parent)):
        return os.path.dirname(parent)
    return None


def source_folders(spec: str) -> dict[str, str]:
    """Local folders of the Hugging Face config and tokenizer each role starts from."""
    root = run_root(spec)
    if root:
        return {role: local_copy(os.path.join(root, MODELS, role)) for role in ROLES}
    if reads_as_export(spec):
        folder = local_copy(os.path.expanduser(spec))
        return {role: tower_path(folder, role) for role in ROLES}
    folder = resolve_checkpoint(spec)
    return {role: folder for role in ROLES}


def remote_model_folder(spec: str, role: str) -> str:
    """The folder whose config.json ``role``'s model (a tower's or the reader's) starts from, for a
    URL ``spec``, without copying it: a run's models/ROLE/, an export's tower or reader/ folder,
    else the checkpoint folder itself."""
    root = run_root(spec)
    if root:
        return f"{root.rstrip('/')}/{MODELS}/{role}"
    if role == READER:
        return reader_path(spec) if holds_reader(spec) else spec.rstrip("/")
    return tower_path(spec, role) if reads_as_export(spec) else spec.rstrip("/")


def reader_source_folder(spec: str) -> str:
    """The local folder of the config and tokenizer a reader starts from (a run's: its models/reader/)."""
    root = run_root(spec)
    return local_copy(os.path.join(root, MODELS, READER)) if root else reader_folder_of(spec)


def copy_initial_models(workdir: str, source: str | None, roles: dict[str, str], lengths: dict[str, int],
                        reader: tuple[str, ReaderSettings] | None = None) -> None:
    """WORKDIR/models/ROLE/: the config and tokenizer each role's model starts from (not the
    weights): the towers' from the retriever ``source`` (None: the run trains no towers), the
    reader's from ``reader`` = (its argument, how it reads; recorded in its art_jax_reader.json);
    and models.json: the sources, each role's parameter group and max length. Once: a resumed run
    keeps what the run started from."""
    target = os.path.join(workdir, MODELS)
    if storage.isfile(os.path.join(target, "models.json")):
        return
    folders = source_folders(source) if source else {}
    if reader:
        folders[READER] = reader_source_folder(reader[0])
    for role, folder in folders.items():
        with tempfile.TemporaryDirectory() as saved:
            load_tokenizer(folder).save_pretrained(saved)
            if role == READER:
                write_json(os.path.join(saved, READER_FILE), settings_record(reader[1]))
            files = {name: os.path.join(saved, name) for name in os.listdir(saved)}
            files["config.json"] = os.path.join(folder, "config.json")
            for name, path in sorted(files.items()):
                with open(path, "rb") as f:
                    storage.write_bytes(os.path.join(target, role, name), f.read())
    meta = {"source": source, **({"reader_source": reader[0]} if reader else {}),
            "roles": {role: {"group": group, "max_length": lengths.get(role)} for role, group in roles.items()}}
    storage.write_text(os.path.join(target, "models.json"), json.dumps(meta, indent=1))  # last: complete


@dataclasses.dataclass
class RunTowers:
    """A run's towers at one checkpoint, and where they came from."""

    question: Bert
    passage: Bert
    tokenizer: object
    question_max_length: int
    passage_max_length: int
    provenance: dict
    question_truncation: str = "right"  # the run's retriever.question_truncation


def locate(spec: str, *, step: int | None = None, best: bool = False) -> tuple[str, str, int]:
    """(workdir, checkpoint folder "checkpoints" or "best", step) of a run workdir (its newest
    checkpoint, or ``step``, or ``best``), or of a checkpoint folder (WORKDIR/checkpoints/N,
    WORKDIR/best or WORKDIR/best/N)."""
    workdir = run_root(spec)
    if workdir is None:
        raise UserError(f"{spec}: not a training run (no config.json and checkpoints/) or a checkpoint folder of one")
    if best and step is not None:
        raise UserError("--step and --best: give one of them")
    spec = spec.rstrip("/")
    if spec == workdir:
        folder = BEST if best else CHECKPOINTS
    elif step is not None or best:
        raise UserError(f"{spec} is one checkpoint: --step and --best are for a run workdir")
    elif os.path.basename(spec) == BEST:
        folder = BEST
    else:
        folder, step = os.path.basename(os.path.dirname(spec)), int(os.path.basename(spec))
    if not storage.isdir(os.path.join(workdir, folder)):
        raise UserError(f"{workdir}: no {folder}/ folder (no checkpoint saved there yet)")
    listing = Checkpoints(workdir, folder=folder, read_only=True)
    steps = listing.steps()
    listing.close()
    if not steps:
        raise UserError(f"{os.path.join(workdir, folder)}: no finished checkpoint yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{os.path.join(workdir, folder)}: no checkpoint of step {step} (there are {steps})")
    return workdir, folder, step


def _check_towers(workdir: str, meta: dict) -> None:
    if ROLES[0] not in meta["roles"]:
        raise UserError(f"{workdir}: this run trains a reader alone (method {read_run_config(workdir).method}); "
                        "it has no retriever towers")


def _models_meta(workdir: str) -> dict:
    path = os.path.join(workdir, MODELS, "models.json")
    if not storage.isfile(path):
        raise UserError(f"{workdir}: the run records no initial models ({path} is missing; runs made before "
                        "this version of art_jax cannot be read back)")
    return read_json(path)


def restore_groups(checkpoints: Checkpoints, step: int, groups: list[str], sharding) -> dict[str, dict]:
    """The parameters of ``groups`` at ``step`` (nested dicts, as saved), placed by ``sharding``;
    nothing else of the state is read, so the optimizer's shape need not be known."""
    tree = checkpoints.state_metadata(step)
    missing = [g for g in groups if g not in tree["params"]]
    if missing:
        raise UserError(f"{checkpoints.directory}/{step}: no parameters of {missing} "
                        f"(the checkpoint has {sorted(tree['params'])})")
    wanted = lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)  # noqa: E731
    like = jax.tree.map(lambda _: SKIP, tree)
    like["params"] = {g: jax.tree.map(wanted, tree["params"][g]) if g in groups else like["params"][g]
                      for g in tree["params"]}
    state, _ = checkpoints.restore(step, like)
    return {g: state["params"][g] for g in groups}


def module_from_params(module_cls, cfg, params: dict):
    """A ``module_cls(cfg)`` holding ``params`` (nested dicts as ``restore_groups`` gives them)."""
    graphdef, abstract = nnx.split(abstract_module(module_cls, cfg))

    def value(path):
        node = params
        for key in (*path, "value"):
            node = node[str(key)]
        return node

    return nnx.merge(graphdef, nnx.from_flat_state({path: var.replace(value(path))
                                                    for path, var in nnx.to_flat_state(abstract)}))


def tower_from_params(model_dir: str, params: dict) -> Bert:
    """A tower (BERT, RoBERTa, Megatron's pre-LN BERT) of the config in ``model_dir`` holding ``params``
    (as ``restore_groups`` gives them), with a pooler and a projection head where they have one (the
    head's size, and whether it ends in a LayerNorm, are its parameters')."""
    cfg = bert_config_from_hf(read_config(model_dir), {}, with_pooler="pooler" in params)
    if "head" in params:
        dim = np.shape(params["head"]["dense"]["kernel"]["value"])[-1]
        cfg = dataclasses.replace(cfg, projection=True, projection_norm="norm" in params["head"],
                                  projection_dim=0 if dim == cfg.hidden_size else int(dim))
    return module_from_params(Bert, cfg, params)


def read_tower(workdir: str, checkpoints: Checkpoints, step: int, role: str, mesh=None) -> Bert:
    """One role's tower at ``step`` of the run in ``workdir``, replicated on ``mesh`` (default:
    this process's devices); only its parameter group is read."""
    meta = _models_meta(workdir)
    _check_towers(workdir, meta)
    group = meta["roles"][role]["group"]
    params = restore_groups(checkpoints, step, [group], _replicated(mesh))[group]
    return tower_from_params(local_copy(os.path.join(workdir, MODELS, role)), params)


def _replicated(mesh) -> NamedSharding:
    """Replicated over ``mesh`` (default: this process's devices): a read-back tower for local work."""
    return NamedSharding(mesh or make_mesh(devices=jax.local_devices()), P())


def read_run_tower(spec: str, role: str, *, step: int | None = None, best: bool = False,
                   mesh=None) -> tuple[Bert, int]:
    """One role's tower of a run workdir or checkpoint folder, and its max length: only that
    tower's parameters are read."""
    workdir, folder, step = locate(spec, step=step, best=best)
    checkpoints = Checkpoints(workdir, folder=folder, read_only=True)
    tower = read_tower(workdir, checkpoints, step, role, mesh)
    checkpoints.close()
    return tower, _models_meta(workdir)["roles"][role]["max_length"]


def _provenance(workdir: str, checkpoints: Checkpoints, step: int, meta: dict) -> dict:
    """Where an export of ``step`` came from: the run, checkpoint, index version, the sources its
    models started from, the metric that chose it, the run's config."""
    record = checkpoints.record(step)
    return {"run": workdir, "checkpoint": os.path.join(checkpoints.directory, str(step)), "step": step,
            "index_version": record.get("index_version"), "source": meta["source"],
            **({"reader_source": meta["reader_source"]} if "reader_source" in meta else {}),
            **({"metric": record["metric"], "value": record["value"]} if "metric" in record else {}),
            "config": read_run_config(workdir).to_dict()}


def read_run(spec: str, *, step: int | None = None, best: bool = False, mesh=None) -> RunTowers:
    """Both towers of a run workdir or checkpoint folder (default: the newest checkpoint),
    replicated on ``mesh`` (default: this process's devices)."""
    workdir, folder, step = locate(spec, step=step, best=best)
    meta = _models_meta(workdir)
    _check_towers(workdir, meta)
    checkpoints = Checkpoints(workdir, folder=folder, read_only=True)
    sharding = _replicated(mesh)
    groups = sorted({meta["roles"][role]["group"] for role in ROLES})
    params = restore_groups(checkpoints, step, groups, sharding)
    models = os.path.join(workdir, MODELS)
    towers = {role: tower_from_params(local_copy(os.path.join(models, role)), params[meta["roles"][role]["group"]])
              for role in ROLES}
    provenance = _provenance(workdir, checkpoints, step, meta)
    checkpoints.close()
    truncation = provenance["config"]["retriever"].get("question_truncation", "right")
    return RunTowers(towers["question"], towers["passage"], load_tokenizer(local_copy(os.path.join(models, "question"))),
                     meta["roles"]["question"]["max_length"], meta["roles"]["passage"]["max_length"], provenance,
                     truncation)


def load_reader(spec: str, *, mesh=None, step: int | None = None, best: bool = False, **overrides) -> Reader:
    """The reader ``spec`` names: a training run that trains one (its newest checkpoint, ``step``'s
    or its best), an export with reader/, or a Hugging Face T5 folder or hub id; ``overrides``:
    T5Config fields (dropout, compute dtype, remat and its policy)."""
    if run_root(os.path.normpath(os.path.expanduser(spec)) if not storage.is_remote(spec) else spec.rstrip("/")):
        return read_run_reader(spec, step=step, best=best, mesh=mesh, **overrides)
    if step is not None or best:
        raise UserError(f"a step or the best checkpoint (--step/--best) can only be chosen from a training run; "
                        f"{spec} is not one")
    return read_reader_folder(reader_folder_of(spec), mesh=mesh, **overrides)


def read_run_reader(spec: str, *, step: int | None = None, best: bool = False, mesh=None, **overrides) -> Reader:
    """The reader of a run workdir or checkpoint folder (default: the newest checkpoint), replicated
    on ``mesh``; a Joint top-K run's with its trained lambda. Only the reader's parameters are read."""
    workdir, folder, step = locate(spec, step=step, best=best)
    roles = _models_meta(workdir)["roles"]
    if READER not in roles:
        raise UserError(f"{workdir}: this run trains no reader (its method trains retriever towers only)")
    groups = [roles[READER]["group"], *([roles[JOINT]["group"]] if JOINT in roles else [])]
    checkpoints = Checkpoints(workdir, folder=folder, read_only=True)
    params = restore_groups(checkpoints, step, groups, _replicated(mesh))
    checkpoints.close()
    model_dir = local_copy(os.path.join(workdir, MODELS, READER))
    reader_params = params[groups[0]]
    cfg = t5_config_from_hf(read_config(model_dir), {}, untied_lm_head="lm_head" in reader_params, **overrides)
    settings = read_settings(model_dir)
    if JOINT in roles:
        settings = dataclasses.replace(settings, joint_lambda=float(params[groups[1]]["weight"]["value"]))
    return Reader(module_from_params(T5, cfg, reader_params), load_tokenizer(model_dir), settings,
                  os.path.join(checkpoints.directory, str(step)))


def export_run(spec: str, out: str, *, step: int | None = None, best: bool = False) -> str:
    """`art-jax export --run`: the towers and the reader (those the run trains) of a run's checkpoint
    (default: the newest) as an export folder, with the run's config, step, index version and the
    metric that chose it."""
    workdir, folder, found = locate(spec, step=step, best=best)
    meta = _models_meta(workdir)
    # towers and reader from the one checkpoint found, though a live run saves newer ones meanwhile;
    # every process reads: Orbax restores together
    pinned = os.path.join(workdir, folder, str(found))
    run = read_run(pinned) if ROLES[0] in meta["roles"] else None
    reader = read_run_reader(pinned) if READER in meta["roles"] else None
    if run:
        check_max_lengths(run.question, run.passage, run.question_max_length, run.passage_max_length)
        provenance = run.provenance
    else:
        checkpoints = Checkpoints(workdir, folder=folder, read_only=True)
        provenance = _provenance(workdir, checkpoints, found, meta)
        checkpoints.close()
    if is_lead():
        export_retriever(run and run.question, run and run.passage, run and run.tokenizer, out,
                         question_max_length=run.question_max_length if run else 0,
                         passage_max_length=run.passage_max_length if run else 0,
                         question_truncation=run.question_truncation if run else "right", provenance=provenance,
                         reader=reader)
    return out
