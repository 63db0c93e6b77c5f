"""The field's multi-output networks, small enough to test: GoogLeNet-style auxiliary classifiers, and MMoE.

- `inception_aux`: a convolutional stem, Inception modules (1x1, 3x3, 5x5 and
  pooling branches concatenated: Szegedy et al. 2015, "Going deeper with
  convolutions", Figure 2b), global pooling and a softmax `main_output`, with
  auxiliary classifiers on intermediate modules that predict the same label,
  as the papers place them. `v1` (GoogLeNet): `aux_1` on module 4a and
  `aux_2` on 4d, each average pooling 5x5 stride 3, a 1x1 convolution, a
  Dense layer, dropout 0.7 and a softmax, weighted 0.3 in the total loss.
  `v3` (Szegedy et al. 2016, "Rethinking the Inception Architecture",
  Sections 4 and 7): one head at the end of the stage, with batch
  normalization in it (the paper's "BN-auxiliary") and after every
  convolution, and each 5x5 branch factorized into two 3x3 convolutions
  (its Figure 5). The paper gives no weight for the head; 0.4 is the one
  TF-slim's Inception-v3 training used for its auxiliary logits. GoogLeNet's stride-2 stem and its 9 modules shrink a
  224 x 224 image; here the stem keeps the size and the stages are 3a; 4a-4e;
  5a, pooled in between, so that an image of a dozen pixels still reaches 5a.
- `mmoe` (Ma et al. 2018, "Modeling Task Relationships in Multi-task
  Learning with Multi-gate Mixture-of-Experts", Figure 1c): `num_experts`
  ReLU experts on the input; for each task a softmax gate on the input mixes
  them, and a tower reads the mixture. `shared_bottom` (Figure 1a), its
  baseline: one shared layer, and a tower per task.
- `multi_lenet` (Sener and Koltun 2018, "Multi-task learning as
  multi-objective optimization", Appendix: the network of their Multi-MNIST
  experiments, which LibMTL-style benchmarks on two-digit images reuse): a
  shared LeNet encoder (two convolutions, each max-pooled, and a Dense
  layer) and a tower per task. Their code convolves 28 x 28 images with 5x5
  kernels and adds dropout; here the kernels are 3x3, so that a 12 x 12
  `multi_digits` image keeps 3 x 3 after the two poolings, and there is no
  dropout.
"""

from __future__ import annotations

import keras

from mto_tf.config import TrainConfig

def kernel_regularizer(config: TrainConfig) -> keras.regularizers.Regularizer | None:
    """`--l2` on every kernel of a built-in model; None for 0."""
    return keras.regularizers.L2(config.l2) if config.l2 else None


# Each head's loss weight in the papers.
INCEPTION_AUX_WEIGHTS = {"v1": {"aux_1": 0.3, "aux_2": 0.3}, "v3": {"aux_1": 0.4}}
_MAIN_DROPOUT, _AUX_DROPOUT = 0.4, 0.7  # GoogLeNet's.


def inception_output_names(config: TrainConfig) -> list[str]:
    """`main_output` and the variant's auxiliary heads."""
    return ["main_output", *INCEPTION_AUX_WEIGHTS[config.inception_variant]]


def inception_losses(config: TrainConfig) -> dict[str, str]:
    """Every head predicts the same class id."""
    return dict.fromkeys(inception_output_names(config), "sparse_categorical_crossentropy")


def inception_loss_weights(config: TrainConfig) -> dict[str, float]:
    """The papers' weights: 1 for the main head, 0.3 (v1) or 0.4 (v3) for each auxiliary one."""
    return {"main_output": 1.0, **INCEPTION_AUX_WEIGHTS[config.inception_variant]}


def inception_metrics(config: TrainConfig) -> dict[str, tuple[str, ...]]:
    """Each head's accuracy."""
    return dict.fromkeys(inception_output_names(config), ("accuracy",))


def build_inception_aux(config: TrainConfig) -> keras.Model:
    """A small GoogLeNet (`v1`) or Inception-v3-style (`v3`) network with auxiliary classifiers."""
    v3 = config.inception_variant == "v3"
    regularizer = kernel_regularizer(config)
    width = config.inception_filters

    def conv(tensor, filters, size, name):
        tensor = keras.layers.Conv2D(filters, size, padding="same", use_bias=not v3, kernel_regularizer=regularizer,
                                     name=name)(tensor)
        if v3:  # Inception-v2/v3 normalize every convolution's output.
            tensor = keras.layers.BatchNormalization(name=f"{name}_bn")(tensor)
        return keras.layers.ReLU(name=f"{name}_relu")(tensor)

    def module(tensor, name):
        """One Inception module: four branches side by side, concatenated along the channels."""
        one = conv(tensor, 2 * width, 1, f"{name}_1x1")
        three = conv(conv(tensor, width, 1, f"{name}_3x3_reduce"), 2 * width, 3, f"{name}_3x3")
        five = conv(tensor, max(1, width // 2), 1, f"{name}_5x5_reduce")
        # v3 factorizes the 5x5 into two 3x3: the same view for 18/25 of the cost.
        five = (conv(conv(five, width, 3, f"{name}_5x5_a"), width, 3, f"{name}_5x5_b") if v3
                else conv(five, width, 5, f"{name}_5x5"))
        pool = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(tensor)
        pool = conv(pool, width, 1, f"{name}_pool_proj")
        return keras.layers.Concatenate(name=name)([one, three, five, pool])

    def auxiliary_head(tensor, name):
        """GoogLeNet's auxiliary classifier (v3: with batch normalization), predicting the main label."""
        side = tensor.shape[1]
        tensor = keras.layers.AveragePooling2D(min(5, side), strides=3, name=f"{name}_pool")(tensor)
        tensor = conv(tensor, 2 * width, 1, f"{name}_conv")
        tensor = keras.layers.Flatten(name=f"{name}_flatten")(tensor)
        tensor = keras.layers.Dense(config.aux_head_units, use_bias=not v3, kernel_regularizer=regularizer,
                                    name=f"{name}_dense")(tensor)
        if v3:
            tensor = keras.layers.BatchNormalization(name=f"{name}_dense_bn")(tensor)
        tensor = keras.layers.ReLU(name=f"{name}_dense_relu")(tensor)
        tensor = keras.layers.Dropout(_AUX_DROPOUT, name=f"{name}_dropout")(tensor)
        return keras.layers.Dense(config.num_classes, activation="softmax", kernel_regularizer=regularizer,
                                  name=name)(tensor)

    image = keras.Input(shape=(config.image_size, config.image_size, config.image_channels), name="image")
    # Pixels 0..255, as multi_digits and TFDS image datasets store them.
    tensor = keras.layers.Rescaling(1 / 255, name="rescale")(image)
    tensor = conv(tensor, 2 * width, 3, "stem")
    tensor = module(tensor, "module_3a")
    tensor = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool_3")(tensor)
    heads = {}
    for index, letter in enumerate("abcde"):
        tensor = module(tensor, f"module_4{letter}")
        if not v3 and letter in "ad":  # GoogLeNet's heads sit on 4a and 4d.
            heads[f"aux_{len(heads) + 1}"] = auxiliary_head(tensor, f"aux_{len(heads) + 1}")
    if v3:  # Inception-v3's one head sits at the end of the stage.
        heads["aux_1"] = auxiliary_head(tensor, "aux_1")
    tensor = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool_4")(tensor)
    tensor = module(tensor, "module_5a")
    tensor = keras.layers.GlobalAveragePooling2D(name="global_pool")(tensor)
    tensor = keras.layers.Dropout(_MAIN_DROPOUT, name="dropout")(tensor)
    main_output = keras.layers.Dense(config.num_classes, activation="softmax", kernel_regularizer=regularizer,
                                     name="main_output")(tensor)
    return keras.Model(inputs={"image": image}, outputs={"main_output": main_output, **heads},
                       name=f"inception_aux_{config.inception_variant}")


def task_output_names(config: TrainConfig) -> list[str]:
    """mmoe's, shared_bottom's and multi_lenet's outputs, one tower each."""
    return config.task_outputs.split(",")


def build_mmoe(config: TrainConfig) -> keras.Model:
    """Multi-gate Mixture-of-Experts: each task's softmax gate mixes the shared experts for its tower."""
    regularizer = kernel_regularizer(config)
    features = keras.Input(shape=(config.features_dim,), name="features")
    experts = [keras.layers.Dense(config.expert_units, activation="relu", kernel_regularizer=regularizer,
                                  name=f"expert_{index}")(features) for index in range(config.num_experts)]
    # (batch, experts, units), with layers model.keras can hold (a Lambda would need unsafe deserialization).
    stacked = keras.layers.Concatenate(axis=1, name="experts")(
        [keras.layers.Reshape((1, config.expert_units), name=f"expert_{index}_row")(expert)
         for index, expert in enumerate(experts)])
    outputs = {}
    for task in task_output_names(config):
        gate = keras.layers.Dense(config.num_experts, activation="softmax", kernel_regularizer=regularizer,
                                  name=f"{task}_gate")(features)
        # sum_e gate_e * expert_e: (batch, experts) x (batch, experts, units) -> (batch, units).
        mixed = keras.layers.Dot(axes=(1, 1), name=f"{task}_mixture")([gate, stacked])
        outputs[task] = _tower(mixed, task, config, regularizer)
    return keras.Model(inputs={"features": features}, outputs=outputs, name="mmoe")


def build_shared_bottom(config: TrainConfig) -> keras.Model:
    """The baseline: one shared bottom layer, a tower per task."""
    regularizer = kernel_regularizer(config)
    features = keras.Input(shape=(config.features_dim,), name="features")
    bottom = keras.layers.Dense(config.expert_units, activation="relu", kernel_regularizer=regularizer,
                                name="shared_bottom")(features)
    return keras.Model(inputs={"features": features},
                       outputs={task: _tower(bottom, task, config, regularizer) for task in task_output_names(config)},
                       name="shared_bottom")


def build_multi_lenet(config: TrainConfig) -> keras.Model:
    """Sener and Koltun's MultiLeNet: a LeNet encoder shared by every task, then a tower per task."""
    regularizer = kernel_regularizer(config)
    image = keras.Input(shape=(config.image_size, config.image_size, config.image_channels), name="image")
    tensor = keras.layers.Rescaling(1 / 255, name="rescale")(image)  # Pixels 0..255, as multi_digits stores them.
    for index, filters in enumerate((config.conv_filters, 2 * config.conv_filters), start=1):
        tensor = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_regularizer=regularizer,
                                     name=f"shared_conv_{index}")(tensor)
        # "same": an odd or tiny image still pools (12 -> 6 -> 3 as with "valid").
        tensor = keras.layers.MaxPooling2D(2, padding="same", name=f"shared_pool_{index}")(tensor)
    tensor = keras.layers.Flatten(name="shared_flatten")(tensor)
    shared = keras.layers.Dense(config.dense_units, activation="relu", kernel_regularizer=regularizer,
                                name="shared_dense")(tensor)
    return keras.Model(inputs={"image": image},
                       outputs={task: _tower(shared, task, config, regularizer) for task in task_output_names(config)},
                       name="multi_lenet")


def _tower(tensor, task: str, config: TrainConfig, regularizer):
    tensor = keras.layers.Dense(config.tower_units, activation="relu", kernel_regularizer=regularizer,
                                name=f"{task}_tower")(tensor)
    if config.task_classes:
        return keras.layers.Dense(config.task_classes, activation="softmax", kernel_regularizer=regularizer,
                                  name=task)(tensor)
    return keras.layers.Dense(1, kernel_regularizer=regularizer, name=task)(tensor)


def task_losses(config: TrainConfig) -> dict[str, str]:
    """Mean squared error for a regression tower, sparse categorical cross-entropy for a softmax one."""
    loss = "sparse_categorical_crossentropy" if config.task_classes else "mean_squared_error"
    return dict.fromkeys(task_output_names(config), loss)


def task_loss_weights(config: TrainConfig) -> dict[str, float]:
    """Every task weighs the same (the MMoE paper's sum)."""
    return dict.fromkeys(task_output_names(config), 1.0)


def task_metrics(config: TrainConfig) -> dict[str, tuple[str, ...]]:
    """Mean absolute error for a regression tower, accuracy for a softmax one."""
    metric = "accuracy" if config.task_classes else "mean_absolute_error"
    return dict.fromkeys(task_output_names(config), (metric,))
