"""Particles sharded across the replicas of a ``tf.distribute`` strategy.

ES needs very little to cross devices: every replica can regenerate any pair's noise,
minibatch and re-initialization keys from integers (`keras_es.noise`), so a replica
that holds pairs ``[first_pair, first_pair + pairs_per_replica)`` runs them on its own
and contributes only a ``dim``-sized partial estimate and a handful of scalars to one
all-reduce per window, after one of two floats per pair (every pair's loss difference
and validity, which the estimator's outlier clipping and ``normalize`` need). No
model-sized tensor is ever exchanged: theta
and the outer optimizer are mirrored and updated identically on every replica from the
same reduced estimate.

A `Shard` tells the estimator which pairs the current replica holds and how to sum
across replicas; `replica_shard` builds it inside ``strategy.run``, and `single` is the
one-device case. `ShardedParticles` keeps the per-replica particle states and
checkpoints them in the single-device layout (pairs in global order), so a checkpoint
restores under any strategy with the same number of particles.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

from keras_es import tf_compat


class Shard(NamedTuple):
    """The antithetic pairs one replica holds, and how it combines with the others.

    Attributes:
        first_pair: int32 scalar (tensor or int), global index of the replica's first
            pair; its pairs are ``first_pair + range(local pairs)``.
        total_pairs: Number of pairs over all replicas (Python int).
        all_reduce: ``fn(tensor) -> tensor`` summing over replicas.
    """

    first_pair: Any
    total_pairs: int
    all_reduce: Callable[[tf.Tensor], tf.Tensor]


def _identity(x):
    return x


def single(num_pairs: int) -> Shard:
    """The shard of a one-device run: every pair, no communication."""
    return Shard(0, int(num_pairs), _identity)


def replica_shard(total_pairs: int) -> Shard:
    """The current replica's shard; call inside ``strategy.run``.

    Replica ``r`` holds pairs ``[r * total_pairs / R, (r + 1) * total_pairs / R)``.
    The replica id is a tensor on TPUs, so ``first_pair`` is computed in the graph.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync
    per_replica = total_pairs // replicas
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return Shard(replica_id * per_replica, int(total_pairs),
                 lambda x: context.all_reduce(tf.distribute.ReduceOp.SUM, x))


def check_strategy(strategy, num_particles: int) -> tf.distribute.Strategy:
    """Returns ``strategy`` (default: the current one) after checking that every replica
    gets whole antithetic pairs; raises ``ValueError`` otherwise."""
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(f"strategy={strategy!r} is invalid; expected a tf.distribute.Strategy "
                         "(MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy) or None.")
    replicas = strategy.num_replicas_in_sync
    if num_particles % (2 * replicas):
        raise ValueError(
            f"num_particles={num_particles} is invalid for a strategy with {replicas} "
            f"replicas; expected a multiple of {2 * replicas} (2 x replicas), so that every "
            "replica holds the same number of whole antithetic pairs.")
    return strategy


class ShardedParticles(tf_compat.TensorSaveable):
    """Per-replica particle and estimator states, checkpointed in global pair order.

    The states are ``tf.distribute`` per-replica values (plain tensors for the
    default strategy). TensorFlow's variables cannot hold a different value on each
    replica and still save one combined tensor (a mirrored variable saves one copy, a
    sync-on-read one an aggregate), so this object is a `keras_es.tf_compat.TensorSaveable`:
    saving concatenates the shards (all-gathering them when replicas live in other
    processes), restoring slices them back.

    Args:
        strategy: The strategy the states live under.
        values: Nest of per-replica tensors.
        rows: Nest of the same structure: rows each replica holds of a leaf (its
            leading dimension), or 0 for a leaf every replica holds whole and equal.
    """

    def __init__(self, strategy: tf.distribute.Strategy, values, rows):
        self.strategy = strategy
        self.values = values
        self.rows = rows
        self._gather_fn = None

    # ------------------------------------------------------------------ layout
    def _is_local(self, leaf) -> bool:
        return len(self.strategy.experimental_local_results(leaf)) == \
            self.strategy.num_replicas_in_sync

    def gather(self):
        """The states in global layout (every pair, in order), as plain tensors."""
        leaves = tf.nest.flatten(self.values)
        rows = tf.nest.flatten(self.rows)
        if all(self._is_local(v) for v in leaves):
            out = []
            for leaf, r in zip(leaves, rows, strict=True):
                parts = self.strategy.experimental_local_results(leaf)
                out.append(tf.identity(parts[0]) if r == 0 else tf.concat(parts, 0))
        else:
            # Replicas in other processes: an all-gather, which every worker must call.
            if self._gather_fn is None:
                def gather(values):
                    def replica(vals):
                        context = tf.distribute.get_replica_context()
                        return [v if r == 0 else _all_gather(context, v)
                                for v, r in zip(vals, rows, strict=True)]
                    return self.strategy.run(replica, args=(values,))
                self._gather_fn = tf.function(gather, autograph=False)
            gathered = self._gather_fn(leaves)
            out = [tf.identity(self.strategy.experimental_local_results(g)[0])
                   for g in gathered]
        return tf.nest.pack_sequence_as(self.values, out)

    def scatter(self, global_values) -> None:
        """Replaces the states with ``global_values`` (global layout), sliced per replica."""
        rows = tf.nest.flatten(self.rows)
        leaves = tf.nest.flatten(global_values)

        def value_fn(context):
            r_id = context.replica_id_in_sync_group
            return tf.nest.pack_sequence_as(
                self.values,
                [tf.identity(v) if r == 0 else tf.identity(v[r_id * r:(r_id + 1) * r])
                 for v, r in zip(leaves, rows, strict=True)])

        self.values = self.strategy.experimental_distribute_values_from_function(value_fn)

    # ------------------------------------------------------------------ checkpoints
    def tensors_to_save(self) -> dict:
        """``{"leaf_<i>": tensor}``: every leaf of `gather`'s global layout."""
        flat = tf.nest.flatten(self.gather())
        return {f"leaf_{i}": t for i, t in enumerate(flat)}

    def restore_tensors(self, restored_tensors: dict) -> None:
        """Checks ``restored_tensors`` (from `tensors_to_save`) against the current
        leaves, by count, shape and dtype, and scatters them to the replicas."""
        current = tf.nest.flatten(self.gather())
        if len(restored_tensors) != len(current):
            raise ValueError(f"The checkpoint holds {len(restored_tensors)} particle tensors, "
                             f"this trainer {len(current)}; expected an identically built "
                             "trainer (same system, estimator and num_particles). A "
                             "checkpoint of keras_es 0.1 holds one fewer (before "
                             "EstimatorState.scale) and does not load into this version.")
        leaves = []
        for i, now in enumerate(current):
            value = restored_tensors[f"leaf_{i}"]
            if value.shape != now.shape or value.dtype != now.dtype:
                raise ValueError(
                    f"Checkpointed particle tensor {i} has shape {value.shape} and dtype "
                    f"{value.dtype.name}; this trainer expects {now.shape} and {now.dtype.name} "
                    "(same system, estimator and num_particles).")
            leaves.append(value)
        self.scatter(tf.nest.pack_sequence_as(self.values, leaves))


def _all_gather(context, value):
    # The identity places the value on the replica's device: a collective on a
    # function input without a device fails ("destinations can not be empty").
    value = tf.identity(value)
    if value.dtype == tf.bool:  # collectives take no bools
        return context.all_gather(tf.cast(value, tf.int32), axis=0) > 0
    return context.all_gather(value, axis=0)


def write_checkpoint(strategy: tf.distribute.Strategy, checkpoint: tf.train.Checkpoint,
                     path: str) -> str:
    """Writes ``checkpoint`` to ``path`` from the chief; other workers write to a
    temporary directory they delete, since each must take part in gathering the shards."""
    if strategy.extended.should_checkpoint:
        return checkpoint.write(path)
    scratch = tempfile.mkdtemp(prefix="keras_es_worker_")
    try:
        checkpoint.write(os.path.join(scratch, os.path.basename(path) or "ckpt"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


# Ops that call back into the Python host: impossible inside a TPU computation.
_HOST_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
# Dtypes TPUs do not compute in.
_TPU_DTYPES_MISSING = frozenset({tf.float64, tf.complex128, tf.string})


def check_tpu_compatible(trainer) -> dict:
    """Checks, on whatever device is at hand, what a ``TPUStrategy`` run needs from a
    `keras_es.MetaTrainer`'s replica step; raises ``ValueError`` on the first problem.

    The replica step (one window of this replica's pairs and the reduction of its
    estimate) is traced with the replica's first pair index as a *tensor*, as TPU
    replica ids are, and compiled with XLA (``jit_compile``). XLA compiles only graphs
    whose every shape is static, so a successful compile shows static shapes; the graph
    is also searched for Python callbacks (``tf.py_function``) and for float64, which
    TPUs lack. The cross-replica sums are left out (identity): XLA on CPU or GPU cannot
    compile TensorFlow's collectives, while on a TPU they become XLA's own
    ``all-reduce``. The trainer is not modified.

    Returns:
        ``{"op_types": sorted op types in the step, "num_ops": count}``.
    """
    system_state, state = trainer.particles.gather()
    theta = tf.constant(trainer.theta_value)
    estimator, system, seed = trainer.estimator, trainer.system, trainer.seed
    total = trainer.num_pairs

    def replica_step(system_state, state, theta, first_pair):
        shard = Shard(first_pair, total, _identity)
        return estimator.window(system, system_state, state, theta, seed, shard)

    step = tf.function(replica_step, jit_compile=True, autograph=False)
    args = (system_state, state, theta, tf.constant(0, tf.int32))
    try:
        step.experimental_get_compiler_ir(*args)(stage="hlo")
    except Exception as error:  # XLA reports unsupported ops and dynamic shapes so
        raise ValueError(f"The replica step of {type(system).__name__} does not compile "
                         f"with XLA: {error}") from error
    graph = step.get_concrete_function(*args).graph
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    op_types = sorted({node.op for node in nodes})
    host = sorted(_HOST_OPS.intersection(op_types))
    if host:
        raise ValueError(f"The replica step of {type(system).__name__} calls Python "
                         f"({host}); a TPU cannot run host callbacks inside its step.")
    for op in graph.get_operations():
        for tensor in op.outputs:
            if tensor.dtype in _TPU_DTYPES_MISSING:
                raise ValueError(f"The replica step of {type(system).__name__} computes "
                                 f"{tensor.dtype.name} ({op.type} {op.name!r}); TPUs have "
                                 "no such dtype.")
    return {"op_types": op_types, "num_ops": len(nodes)}


def collective_payloads(trainer) -> list[dict]:
    """The tensors one outer step of ``trainer`` sends between replicas, read from its
    traced step (nothing is run).

    Lists every collective op (all-reduce, all-gather, broadcast) with the shape, dtype
    and bytes of the tensor one replica contributes, and every edge from an op placed
    on one replica's device to an op placed on another's (an implicit copy, such as
    the reduced estimate reaching the mirrored theta's update on each replica).

    Returns:
        ``[{"kind": "collective" | "copy", "op": op type, "device": device,
        "shape": [...], "dtype": name, "bytes": int or None (unknown shape)}, ...]``.
    """
    concrete = trainer.concrete_step()
    graph = concrete.graph
    out = []

    def entry(kind, op, tensor, device):
        shape = tensor.shape
        # keras_es's own exchanges have static shapes; None marks any other that does not.
        size = (int(shape.num_elements()) * tensor.dtype.size if shape.is_fully_defined()
                else None)
        out.append({"kind": kind, "op": op.type, "device": device,
                    "shape": shape.as_list() if shape.rank is not None else None,
                    "dtype": tensor.dtype.name, "bytes": size})

    for op in graph.get_operations():
        if op.type.startswith(("Collective", "Nccl")) and op.type != "CollectiveAssignGroupV2":
            entry("collective", op, op.inputs[0], op.device)
            continue
        for tensor in op.inputs:
            source, target = tensor.op.device, op.device
            if source and target and tf.DeviceSpec.from_string(source) != \
                    tf.DeviceSpec.from_string(target) and tensor.dtype != tf.resource:
                entry("copy", op, tensor, f"{source} -> {target}")
    return out
