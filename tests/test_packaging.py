"""What importing opd_jax needs: the functional core runs on jax and numpy alone."""

import subprocess
import sys
import textwrap

OPTIONAL = ("tensorflow_datasets", "transformers", "matplotlib", "torch", "grain", "tokenizers")


def test_the_core_imports_and_runs_without_the_optional_extras():
    blocked = ", ".join(repr(name) for name in OPTIONAL + ("flax", "optax", "orbax", "yaml"))
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ({blocked},):
                    raise ModuleNotFoundError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        import jax, jax.numpy as jnp
        from opd_jax import core

        B, T, D, V = 2, 6, 8, 11
        k = jax.random.split(jax.random.key(0), 4)
        h_s, h_t = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (B, T, D))
        w_s, w_t = jax.random.normal(k[2], (D, V)), jax.random.normal(k[3], (D, V))
        tokens = jnp.zeros((B, T), jnp.int32)
        mask = jnp.ones((B, T), jnp.int32)
        seg = core.fixed_segments(mask, 2)
        settings = core.ObjectiveSettings(k=4)
        loss, aux = core.opd_objective(h_s, w_s, h_t, w_t, tokens, mask, seg, None, settings)
        assert jnp.isfinite(loss) and aux.weights.shape == (B, T)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
