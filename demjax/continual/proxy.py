"""Proxy data for data-agnostic consolidation: never the agents' data.

Carta et al., "Projected Latent Distillation for Data-Agnostic Consolidation in
Distributed Continual Learning" (arXiv 2303.15888), Sec. 4 (DAC): the server
distils the agents' models on heavily augmented random crops of a *single*
out-of-distribution image (after Asano & Saeed, "Extrapolating from a Single
Image to a Thousand Classes using Distillation"). demjax offers three proxies
(``config.proxy``):

- ``crops``: random crops of one image (default scikit-learn's bundled
  ``china.jpg``, ``proxy_image``), each with a random scale
  ``U(crop_min_scale, 1)`` of the largest crop of the input's aspect ratio, random
  position, horizontal flip with probability 1/2, and colour jitter (brightness,
  contrast and, for RGB, saturation factors ``U(1 - jitter, 1 + jitter)``),
  resized (bilinear, antialiased) to the input shape; RGB is converted to
  grayscale (ITU-R 601 luma) for 1-channel inputs.
- ``noise``: i.i.d. pixels, ``uniform`` on [0, 1] or ``gaussian`` N(0.5, 0.25^2)
  (``proxy_noise``).
- ``dataset``: images of ANOTHER data set (``proxy_dataset``, e.g. ``digits`` for
  Fashion-MNIST), resized to the input shape, with the same augmentations as
  ``crops``. Using the scenario's own data set is refused.

Samples are drawn fresh with ``jax.random`` at every consolidation step and, with
``standardize``, standardized with the batch's scalar mean and std (the agents'
data are globally standardized the same way; ``demjax.data.sources``).

A ``ProxySource`` holds only its image bank: it is built from the config and the
input shape, never from a ``Scenario``, so it cannot reference agent data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from demjax.continual.config import NOISES, PROXIES, PROXY_IMAGES
from demjax.errors import check_arg

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class ProxySource:
    """A sampler of proxy inputs (see the module docstring).

    Attributes:
      kind: one of ``PROXIES``.
      input_shape: ``(H, W, C)`` of the samples.
      bank: float32 ``[K, Hb, Wb, Cb]`` source images in [0, 1] (None for noise).
    """

    def __init__(
        self,
        kind: str,
        input_shape,
        bank: np.ndarray | None = None,
        *,
        noise: str = "uniform",
        crop_min_scale: float = 0.1,
        jitter: float = 0.4,
        standardize: bool = True,
        name: str = "",
    ):
        check_arg("kind", kind, PROXIES)
        check_arg("noise", noise, NOISES)
        if not 0.0 < crop_min_scale <= 1.0:
            raise ValueError(
                f"crop_min_scale={crop_min_scale!r} is not valid; accepted: (0, 1]"
            )
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter={jitter!r} is not valid; accepted: [0, 1)")
        if kind != "noise" and (bank is None or np.ndim(bank) != 4):
            raise ValueError(
                f"kind={kind!r} needs an image bank [K, H, W, C]; got "
                f"{None if bank is None else np.shape(bank)}"
            )
        self.kind = kind
        self.input_shape = tuple(int(s) for s in input_shape)
        self.bank = None if bank is None else jnp.asarray(bank, jnp.float32)
        self.noise = noise
        self.crop_min_scale = float(crop_min_scale)
        self.jitter = float(jitter)
        self.standardize = bool(standardize)
        self.name = name

    def sample(self, key: jax.Array, batch: int, bank=None) -> jax.Array:
        """``batch`` proxy inputs, float32 ``[batch, H, W, C]`` (jit-compatible).

        ``bank`` replaces ``self.bank`` (pass it as a jit argument so a large bank
        is not baked into the compiled function as a constant).
        """
        h, w, c = self.input_shape
        bank = self.bank if bank is None else bank
        if self.kind == "noise":
            if self.noise == "uniform":
                x = jax.random.uniform(key, (batch, h, w, c))
            else:
                x = jnp.clip(
                    0.5 + 0.25 * jax.random.normal(key, (batch, h, w, c)), 0, 1
                )
        else:
            k_idx, k_aug = jax.random.split(key)
            idx = jax.random.randint(k_idx, (batch,), 0, bank.shape[0])
            keys = jax.random.split(k_aug, batch)
            x = jax.vmap(lambda i, k: self._augment(bank[i], k))(idx, keys)
        if self.standardize:
            x = (x - jnp.mean(x)) / (jnp.std(x) + 1e-3)
        return x

    def _augment(self, img: jax.Array, key: jax.Array) -> jax.Array:
        h, w, c = self.input_shape
        hb, wb, cb = img.shape
        k_s, k_y, k_x, k_f, k_b, k_c, k_sat = jax.random.split(key, 7)
        # Largest crop with the output's aspect ratio, scaled by s.
        full_h = min(hb, wb * h / w)
        s = jax.random.uniform(k_s, (), minval=self.crop_min_scale, maxval=1.0)
        ch = s * full_h
        cw = ch * w / h
        top = jax.random.uniform(k_y) * (hb - ch)
        left = jax.random.uniform(k_x) * (wb - cw)
        scale = jnp.stack([h / ch, w / cw])
        out = jax.image.scale_and_translate(
            img,
            (h, w, cb),
            (0, 1),
            scale,
            -jnp.stack([top, left]) * scale,
            method="linear",
            antialias=True,
        )
        out = jnp.where(jax.random.bernoulli(k_f), out[:, ::-1], out)
        j = self.jitter
        u = lambda k: jax.random.uniform(k, (), minval=1 - j, maxval=1 + j)  # noqa: E731
        out = out * u(k_b)
        out = (out - jnp.mean(out)) * u(k_c) + jnp.mean(out)
        if cb == 3:
            gray = out @ _LUMA
            out = (out - gray[..., None]) * u(k_sat) + gray[..., None]
        out = jnp.clip(out, 0.0, 1.0)
        if c == 1 and cb == 3:
            out = (out @ _LUMA)[..., None]
        elif c == 3 and cb == 1:
            out = jnp.repeat(out, 3, axis=-1)
        return out


def load_image(name: str, short_side: int) -> np.ndarray:
    """One of scikit-learn's bundled sample images (``china.jpg``, ``flower.jpg``),
    float32 ``[1, H, W, 3]`` in [0, 1], downscaled so its short side is
    ``short_side`` (crops are resized again at sampling time).

    Raises:
      ValueError: unknown ``name``.
    """
    from sklearn.datasets import load_sample_image

    check_arg("name", name, PROXY_IMAGES)
    img = load_sample_image(name).astype(np.float32) / 255.0
    f = short_side / min(img.shape[:2])
    if f < 1:
        shape = (round(img.shape[0] * f), round(img.shape[1] * f), 3)
        img = np.asarray(jax.image.resize(img, shape, "linear", antialias=True))
    return img[None]


def _dataset_bank(name: str, config, input_shape, max_images: int) -> np.ndarray:
    from demjax.data import load_source

    x, _, _ = load_source(
        name,
        data_dir=None,
        standardize=False,
        download=bool(config.download),
    )
    rng = np.random.default_rng(int(config.seed) + 1)
    if max_images and x.shape[0] > max_images:
        x = x[np.sort(rng.choice(x.shape[0], max_images, replace=False))]
    # Resized to (a little above) the input size: crops are taken from it.
    h, w, _ = input_shape
    side = 2 * max(h, w)
    if x.shape[1] != side or x.shape[2] != side:
        x = np.asarray(
            jax.image.resize(x, (x.shape[0], side, side, x.shape[3]), "linear")
        )
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def make_proxy(config, input_shape) -> ProxySource:
    """The proxy source of ``config`` (fields ``proxy``, ``proxy_image``,
    ``proxy_noise``, ``proxy_dataset``, ``proxy_dataset_size``,
    ``crop_min_scale``, ``proxy_jitter``, ``standardize``) for inputs ``(H, W, C)``.

    Deliberately takes no ``Scenario``: the consolidation's data cannot come from
    the agents.

    Raises:
      ConfigError: a bad proxy field, or ``proxy_dataset`` equal to ``dataset``
        (``demjax.config_checks.check_proxy``).
    """
    from demjax.config_checks import check_proxy

    check_proxy(config)
    h, w, _ = input_shape
    common = dict(
        noise=config.proxy_noise,
        crop_min_scale=float(config.crop_min_scale),
        jitter=float(config.proxy_jitter),
        standardize=bool(config.standardize),
    )
    if config.proxy == "noise":
        return ProxySource(
            "noise", input_shape, None, name=config.proxy_noise, **common
        )
    if config.proxy == "crops":
        bank = load_image(config.proxy_image, max(32, 4 * max(h, w)))
        return ProxySource(
            "crops", input_shape, bank, name=config.proxy_image, **common
        )
    name = config.proxy_dataset
    bank = _dataset_bank(name, config, input_shape, int(config.proxy_dataset_size))
    return ProxySource("dataset", input_shape, bank, name=name, **common)
