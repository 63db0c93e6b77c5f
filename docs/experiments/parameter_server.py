"""What Keras 3 does under ParameterServerStrategy: the measurements behind docs/multi_worker.md's last section.

    python docs/experiments/parameter_server.py

A ParameterServerStrategy cluster of one worker and two parameter servers,
all in this process (`tf.distribute.Server`s on free ports of 127.0.0.1),
and a tiny two-output model: Embedding(1000, 8), averaged, two Dense(1)
heads `main_output` and `aux_output`, Adam. Two strategies share the
cluster: one without a variable partitioner (every variable whole, on one
parameter server) and one with `FixedShardsPartitioner(2)` (each variable
split in two shards, one per parameter server). Each probe catches what it
raises and prints one line, `key: what was tried -> OK ...` or
`-> ErrorType: first line of the message`, so the output can be compared
line by line with the page (tests/test_parameter_server_page.py does).
The versions of TensorFlow and Keras come first. It exits 0 whatever Keras
does: it is a measurement, not a test. 6 to 8 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

# TensorFlow reads it once, when first imported: without it, every gRPC
# server's start-up is logged. (Standalone: mto_tf itself is not imported.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCABULARY, EMBEDDING_DIM, SEQUENCE_LENGTH, BATCH = 1000, 8, 4, 8
SHARDS = 2  # One per parameter server.
TRAIN_STEPS = 3
# The arithmetic for a table too big to replicate (not measured here).
BIG_TABLE_ROWS, BIG_TABLE_DIM, FLOAT32_BYTES, ADAM_SLOTS = 1_000_000, 512, 4, 2


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (held open together so they differ), as launch/local.py's."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_cluster(*, workers: int = 1, parameter_servers: int = SHARDS) -> tuple[tf.train.ClusterSpec, list]:
    """Every task of the cluster as a server in this process; returns the cluster and the servers (keep them)."""
    ports = iter(free_ports(workers + parameter_servers))
    cluster = tf.train.ClusterSpec({"worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
                                    "ps": [f"127.0.0.1:{next(ports)}" for _ in range(parameter_servers)]})
    # This process is the coordinator (the "chief" of the tutorial); it needs
    # no server of its own, only the workers' and parameter servers' addresses.
    servers = [tf.distribute.Server(cluster, job_name=job, task_index=index, protocol="grpc", start=True)
               for job in cluster.jobs for index in range(cluster.num_tasks(job))]
    return cluster, servers


def parameter_server_strategy(cluster, *, shards: int | None):
    """A ParameterServerStrategy on `cluster`; `shards`: split every variable in that many, or None: keep them whole."""
    partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(shards) if shards else None
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    return tf.distribute.experimental.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def build_model() -> keras.Model:
    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(VOCABULARY, EMBEDDING_DIM, name="embedding")(tokens)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    return keras.Model(tokens, {"main_output": keras.layers.Dense(1, name="main_output")(pooled),
                                "aux_output": keras.layers.Dense(1, name="aux_output")(pooled)}, name="two_outputs")


def toy_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCABULARY, (4 * BATCH, SEQUENCE_LENGTH)).astype(np.int32)
    labels = {name: rng.standard_normal((4 * BATCH, 1)).astype(np.float32) for name in ("main_output", "aux_output")}
    return tokens, labels


def error_line(error: Exception) -> str:
    """`ErrorType: first line of its message`.

    An error raised inside a `tf.function` is re-raised by AutoGraph with
    the user's frames first ("in user code:"); its own message is then
    the last line, after its type.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0] == "in user code:":
        lines = [lines[-1].removeprefix(f"{type(error).__name__}: ")]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def report(key: str, tried: str, probe) -> None:
    """Runs `probe()`; prints `key: tried -> OK[, what it returned]` or `key: tried -> the error's line`."""
    try:
        result = probe()
        outcome = "OK" + (f", {result}" if result else "")
    except Exception as error:  # A measurement: whatever Keras raises is the result.
        outcome = error_line(error)
    print(f"{key}: {tried} -> {outcome}", flush=True)


# --- The probes ------------------------------------------------------------------------------

def keras_files_naming_it() -> str:
    """Keras's Python files that name ParameterServerStrategy or its ClusterCoordinator ("none": no code for it)."""
    root = Path(keras.__file__).parent
    naming = [str(path.relative_to(root)) for path in sorted(root.rglob("*.py"))
              if any(word in path.read_text(errors="replace") for word in ("ParameterServer", "ClusterCoordinator"))]
    return ", ".join(naming) or "none"


def fit(strategy) -> None:
    """`compile` and `fit` as under any other strategy: the model built in the strategy's scope."""
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    tokens, labels = toy_data()
    model.fit(tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(BATCH), epochs=1, verbose=0)


def model_and_optimizer(strategy) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    with strategy.scope():
        model = build_model()
        optimizer = keras.optimizers.Adam(learning_rate=0.01)
        optimizer.build(model.trainable_variables)  # Its slots too are made in the scope, on the parameter servers.
    return model, optimizer


def custom_loop(strategy, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> str:
    """mto_tf's step in miniature, scheduled on the workers as ParameterServerStrategy requires.

    One tape over the summed losses of both outputs, one gradient, one
    `apply_gradients`. A ClusterCoordinator sends each step to a free
    worker, whose update reaches the parameter servers on its own
    (asynchronous training: no all-reduce over workers).
    """
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    tokens, labels = toy_data()

    @tf.function
    def train_step():
        def on_replica():
            with tf.GradientTape() as tape:
                outputs = model(tokens[:BATCH], training=True)
                loss = sum(tf.reduce_mean(tf.square(outputs[name] - labels[name][:BATCH])) for name in labels)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

        return strategy.run(on_replica)

    for _ in range(TRAIN_STEPS):
        coordinator.schedule(train_step)
    coordinator.join()  # Raises the first error a scheduled step raised.
    return f"{int(optimizer.iterations.numpy())} steps applied"


def variable_kinds(model: keras.Model) -> str:
    """What stands behind each Keras variable under this strategy (ShardedVariable: split in shards)."""
    return ", ".join(f"{variable.path}={type(variable.value).__name__}" for variable in model.variables)


def what_the_lookup_gathers_from(lookup) -> str:
    """Each gather in `lookup`'s graph and what it reads, counted.

    A ResourceGather reads only the rows asked for, on the shard's own
    device. A GatherV2 reads a tensor: when that tensor is a ConcatV2 of
    every shard read in full, the whole table is assembled, wherever the
    step runs, for every lookup.
    """
    signature = tf.TensorSpec((None, SEQUENCE_LENGTH), tf.int32)
    graph = tf.function(lookup).get_concrete_function(signature).graph
    gathers = []
    for operation in graph.get_operations():
        if operation.type == "ResourceGather":
            gathers.append("ResourceGather on one shard")
        elif operation.type == "GatherV2":
            source = operation.inputs[0].op
            shard_reads = [tensor for tensor in source.inputs[:-1] if tensor.op.type == "ReadVariableOp"]
            if source.type == "ConcatV2" and len(shard_reads) == len(source.inputs) - 1:
                gathers.append(f"GatherV2 on a ConcatV2 of {len(shard_reads)} whole-shard reads, shape "
                               f"{tuple(source.outputs[0].shape)}")
            else:
                gathers.append(f"GatherV2 on a {source.type}")
    return ", ".join(f"{gathers.count(gather)} x {gather}" for gather in dict.fromkeys(gathers)) or "no gather"


def save_weights(model: keras.Model, directory: str) -> None:
    model.save_weights(os.path.join(directory, "model.weights.h5"))


def checkpoint(model: keras.Model, directory: str) -> None:
    tf.train.Checkpoint(model=model).save(os.path.join(directory, "checkpoint"))


def model_save(model: keras.Model, directory: str) -> None:
    model.save(os.path.join(directory, "model.keras"))


SAVES = {"save_weights": ("model.save_weights", save_weights),
         "checkpoint": ("tf.train.Checkpoint(model=model).save", checkpoint),
         "model_save": ("model.save", model_save)}


def every_save(model: keras.Model, directory: str) -> None:
    """The three ways to save, one after another (the first error stops them)."""
    for _, save in SAVES.values():
        save(model, tempfile.mkdtemp(dir=directory))


def big_table_memory() -> str:
    """The arithmetic, not a measurement: a 1M x 512 float32 table, alone and with Adam's two slots."""
    table = BIG_TABLE_ROWS * BIG_TABLE_DIM * FLOAT32_BYTES
    return (f"{BIG_TABLE_ROWS:,} x {BIG_TABLE_DIM} float32 = {table / 1e9:.2f} GB, "
            f"{table * (1 + ADAM_SLOTS) / 1e9:.2f} GB with Adam's {ADAM_SLOTS} slots, on every replica")


def main() -> None:
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPU cores", flush=True)
    report("keras_source", "Keras files naming ParameterServerStrategy or ClusterCoordinator", keras_files_naming_it)
    cluster, servers = start_cluster()  # `servers` kept: a server stops when it is garbage-collected.
    with tempfile.TemporaryDirectory() as directory:
        # Every variable whole, on one parameter server: what Keras does without sharding in the way.
        whole = parameter_server_strategy(cluster, shards=None)
        report("fit", "model.fit under ParameterServerStrategy", lambda: fit(whole))
        model, optimizer = model_and_optimizer(whole)
        report("custom_loop_unsharded", "tape.gradient + apply_gradients, variables whole, scheduled on a worker",
               lambda: custom_loop(whole, model, optimizer))
        report("saves_unsharded", f"{', '.join(name for name, _ in SAVES.values())}, variables whole",
               lambda: every_save(model, directory))

        # Every variable in shards, one per parameter server: what a table too big for one machine needs.
        sharded = parameter_server_strategy(cluster, shards=SHARDS)
        model, optimizer = model_and_optimizer(sharded)
        report("variables", f"FixedShardsPartitioner({SHARDS}), what backs each Keras variable",
               lambda: variable_kinds(model))
        report("gradient", "tape.gradient over sharded variables, scheduled on a worker",
               lambda: custom_loop(sharded, model, optimizer))
        table = model.get_layer("embedding")
        report("embedding_lookup", f"keras.layers.Embedding on the {SHARDS}-shard table, its graph",
               lambda: what_the_lookup_gathers_from(table))
        report("embedding_lookup_tf", f"tf.nn.embedding_lookup on the same {SHARDS}-shard table, its graph",
               lambda: what_the_lookup_gathers_from(lambda ids: tf.nn.embedding_lookup(table.embeddings.value, ids)))
        for key, (name, save) in SAVES.items():
            report(key, f"{name}, variables sharded", lambda: save(model, tempfile.mkdtemp(dir=directory)))
    report("table_memory", "arithmetic, not measured", big_table_memory)


if __name__ == "__main__":
    main()
