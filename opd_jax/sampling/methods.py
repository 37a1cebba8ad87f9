"""Sampling methods: small frozen dataclasses (pytrees: a new temperature or nucleus mass
does not recompile; a new `k` does) that turn a row's logits into a draw."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class _Categorical:
    """Samples from `log_probs(logits)`; subclasses define the distribution."""

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        raise NotImplementedError

    def sample(self, keys_B: jax.Array, logits_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns sampled tokens `[B]` and their log-probabilities `[B]`; row `b` draws with
        its own key `keys_B[b]` (Gumbel-max), so a row's sample does not depend on the others."""
        logprobs_BxV = self.log_probs(logits_BxV)
        V = logprobs_BxV.shape[-1]
        gumbel_BxV = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys_B)
        tokens_B = jnp.argmax(logprobs_BxV + gumbel_BxV, axis=-1)
        return tokens_B, jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], -1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Greedy(_Categorical):
    """`argmax(logits)`; reports the model's log-probabilities `log_softmax(logits)`."""

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)

    def sample(self, keys_B: jax.Array, logits_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
        del keys_B
        tokens_B = jnp.argmax(logits_BxV, axis=-1)
        logprobs_BxV = self.log_probs(logits_BxV)
        return tokens_B, jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], -1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Temperature(_Categorical):
    """`p ∝ exp(logits / temperature)`."""

    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / self.temperature, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopK(_Categorical):
    """Temperature sampling restricted to the `k` most likely tokens (ties at the k-th kept)."""

    k: int = dataclasses.field(metadata=dict(static=True))
    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        scaled_BxV = logits_BxV.astype(jnp.float32) / self.temperature
        kth_Bx1 = jax.lax.top_k(scaled_BxV, self.k)[0][:, -1:]
        return jax.nn.log_softmax(jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopP(_Categorical):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches
    `p` (after temperature), renormalised."""

    p: float
    temperature: float = 1.0

    def log_probs(self, logits_BxV: jax.Array) -> jax.Array:
        scaled_BxV = logits_BxV.astype(jnp.float32) / self.temperature
        sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of strictly likelier
        kept_BxV = jnp.where(before_BxV < self.p, sorted_BxV, jnp.inf)
        threshold_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        return jax.nn.log_softmax(
            jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV), axis=-1
        )


SamplingMethod = Greedy | Temperature | TopK | TopP
GREEDY = Greedy()


def method_from(temperature: float, top_k: int = 0, top_p: float = 1.0) -> SamplingMethod:
    """Greedy at temperature 0, else top-k (``top_k > 0``), nucleus (``top_p < 1``) or plain
    temperature sampling: the ``sampling`` section of a config."""
    if temperature == 0:
        return Greedy()
    if top_k > 0:
        return TopK(top_k, temperature)
    if top_p < 1.0:
        return TopP(top_p, temperature)
    return Temperature(temperature)
