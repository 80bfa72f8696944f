"""Keras (TensorFlow) twins of four napari-tae models, for ``bench_keras.py``; runs under a Python
that has TensorFlow, and imports nothing of napari-tae or torch.

Each twin is the architecture of the model's paper config as napari-tae builds it (standard
multi-head attention of head width d/h, pre-norm blocks, the same layers and widths), so its
parameter count equals ours and the two do the same arithmetic: what differs is the framework.
``h_tae_s`` is built with global attention (``attention="global"`` on our side), as the original
TensorFlow code of the paper has it. Prints one JSON line::

    python keras_twins.py --model b_tae --batch-sizes 1 8 --threads 1 --min-time 5
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402

L = keras.layers

MODELS = ("ae_spatial", "b_tae", "dc_tae", "h_tae_s")
IMG = 256


def _conv_ae(x, kernel: int, dense: bool):
    """The unified CNN autoencoder: strided convs 32/64/128/128, 1x1 to 16, (dense 512), mirror."""
    act = lambda t: L.LeakyReLU(negative_slope=0.3)(t)  # noqa: E731
    for ch in (32, 64, 128, 128):
        x = act(L.Conv2D(ch, kernel, strides=2, padding="same")(x))
    x = act(L.Conv2D(16, 1)(x))
    if dense:
        x = act(L.Dense(512)(L.Flatten()(x)))
        x = L.Reshape((16, 16, 16))(act(L.Dense(16 * 16 * 16)(x)))
    x = act(L.Conv2D(128, 1)(x))
    for ch in (128, 64, 32, 32):
        x = act(L.Conv2DTranspose(ch, kernel, strides=2, padding="same")(x))
    return L.Conv2D(1, 1)(x)


def _mlp(x, dim: int):
    return L.Dense(dim)(L.Dense(4 * dim, activation="gelu")(x))


def _encoder_block(x, dim: int, heads: int, eps: float):
    y = L.LayerNormalization(epsilon=eps)(x)
    x = x + L.MultiHeadAttention(heads, dim // heads)(y, y)
    return x + _mlp(L.LayerNormalization(epsilon=eps)(x), dim)


def _decoder_block(x, memory, dim: int, heads: int, eps: float):
    y = L.LayerNormalization(epsilon=eps)(x)
    x = x + L.MultiHeadAttention(heads, dim // heads)(y, y)
    x = x + L.MultiHeadAttention(heads, dim // heads)(L.LayerNormalization(epsilon=eps)(x), memory)
    return x + _mlp(L.LayerNormalization(epsilon=eps)(x), dim)


class AddPositions(L.Layer):
    """A learned position embedding added to the tokens."""

    def build(self, shape):
        self.table = self.add_weight(shape=(1, *shape[1:]), initializer="zeros")

    def call(self, tokens):
        return tokens + self.table


def _patch_tokens(x, p: int, dim: int):
    n = (IMG // p) ** 2
    return AddPositions()(L.Reshape((n, dim))(L.Conv2D(dim, p, strides=p)(x)))


def _tokens_to_image(x, p: int):
    g = IMG // p
    return L.Lambda(lambda t: tf.nn.depth_to_space(tf.reshape(t, (-1, g, g, p * p)), p))(x)


def _flat_tae(depth: int, heads: int, dim: int, cnn: bool):
    """B_TAE (dim 96) or DC_TAE (dim = p*p, the dense CNN autoencoder between the two halves)."""
    p, eps = 16, 1e-6
    x = inp = keras.Input((IMG, IMG, 1))
    x = _patch_tokens(x, p, dim)
    for _ in range(depth):
        x = _encoder_block(x, dim, heads, eps)
    memory = L.LayerNormalization(epsilon=eps)(x)
    if cnn:
        image = _conv_ae(_tokens_to_image(memory, p), kernel=3, dense=True)
        memory = L.LayerNormalization(epsilon=eps)(_patch_tokens(image, p, dim))
    x = AddPositions()(memory)
    for _ in range(depth):
        x = _decoder_block(x, memory, dim, heads, eps)
    x = L.Dense(p * p)(L.LayerNormalization(epsilon=eps)(x))
    return keras.Model(inp, _tokens_to_image(x, p))


def _expand(x, scale: int, out_dim: int):
    x = L.Dense(scale * scale * out_dim, use_bias=False)(x)
    return L.LayerNormalization(epsilon=1e-5)(L.Lambda(lambda t: tf.nn.depth_to_space(t, scale))(x))


def _global_blocks(x, dim: int, heads: int):
    side = x.shape[1]
    x = L.Reshape((side * side, dim))(x)
    for _ in range(2):
        x = _encoder_block(x, dim, heads, 1e-5)
    return L.Reshape((side, side, dim))(x)


def _h_tae_s(heads: int = 4, dim: int = 96, stages: int = 4):
    """H_TAE_S with global attention: conv patch embedding p=4, 4 stages of 2 blocks, patch merging
    and expanding, additive skips, the final x4 expansion and a 1x1 read-out."""
    dims = [dim * 2 ** i for i in range(stages)]
    x = inp = keras.Input((IMG, IMG, 1))
    x = L.LayerNormalization(epsilon=1e-5)(L.Conv2D(dims[0], 4, strides=4)(x))
    skips = []
    for i in range(stages):
        if i:
            x = L.Lambda(lambda t: tf.nn.space_to_depth(t, 2))(x)
            x = L.Dense(dims[i], use_bias=False)(L.LayerNormalization(epsilon=1e-5)(x))
        x = _global_blocks(x, dims[i], heads)
        skips.append(x)
    x = _global_blocks(L.LayerNormalization(epsilon=1e-5)(x), dims[-1], heads)
    for k in range(stages - 2, -1, -1):
        x = _expand(x, 2, dims[k])
        x = L.LayerNormalization(epsilon=1e-5)(x + skips[k])
        x = _global_blocks(x, dims[k], heads)
    x = _expand(L.LayerNormalization(epsilon=1e-5)(x), 4, dims[0])
    return keras.Model(inp, L.Conv2D(1, 1)(x))


def build(name: str):
    if name == "ae_spatial":
        inp = keras.Input((IMG, IMG, 1))
        return keras.Model(inp, _conv_ae(inp, kernel=5, dense=False))
    if name == "b_tae":
        return _flat_tae(depth=8, heads=4, dim=96, cnn=False)
    if name == "dc_tae":
        return _flat_tae(depth=12, heads=8, dim=256, cnn=True)
    if name == "h_tae_s":
        return _h_tae_s()
    raise ValueError(f"no Keras twin of {name!r}; known: {', '.join(MODELS)}")


def throughput(name: str, batch_sizes: list[int], min_time: float, repeats: int) -> dict:
    model = build(name)
    forward = tf.function(lambda t: model(t, training=False))
    runs = []
    for bs in batch_sizes:
        x = tf.random.uniform((bs, IMG, IMG, 1))
        for _ in range(2):  # tracing, allocator
            forward(x).numpy()
        n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        while n < repeats or time.perf_counter() - t0 < min_time:
            forward(x).numpy()
            n += 1
        wall = time.perf_counter() - t0
        runs.append({"batch": bs, "slices_per_s": n * bs / wall, "cpu_per_wall": (time.process_time() - cpu0) / wall})
    return {"model": name, "params": int(model.count_params()), "tensorflow": tf.__version__, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # before the first op, or TensorFlow keeps its default pools (every core)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    print(json.dumps(throughput(args.model, args.batch_sizes, args.min_time, args.repeats)))


if __name__ == "__main__":
    main()
