"""Hook sites and the token positions that count.

Two MLP sites matter for skill unlearning (docs/methods.md):

* ``"pre"`` -> ``blocks.{l}.mlp.hook_pre``: the pre-activation. Gated MLPs (Llama, Gemma,
  SmolLM2): ``W_gate @ z``. GELU MLPs (GPT-2, Pythia): ``W_in @ z + b_in``.
* ``"key"`` -> ``blocks.{l}.mlp.hook_post``: the key vector, the input of ``W_out``.

Two block-level sites serve LUNAR: ``"resid_post"`` (``blocks.{l}.hook_resid_post``) and
``"mlp_out"`` (``blocks.{l}.hook_mlp_out``, the MLP's output added to the residual stream).

An example runs as ``[BOS] + prompt tokens + answer tokens`` (:mod:`mechunlearn.batching`).
BOS and padding are never counted; ``positions`` chooses among the rest:

* ``"all"``: every prompt and answer token;
* ``"prompt"``: prompt tokens only;
* ``"answer"``: answer tokens only;
* ``"last"``: the last prompt token (where Key Space Detection reads the key vector).
"""

from __future__ import annotations

SITES: dict[str, str] = {"pre": "hook_pre", "key": "hook_post"}
"""MLP sites: ``blocks.{l}.mlp.<hook>``."""
BLOCK_SITES: dict[str, str] = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out"}
"""Block-level sites: ``blocks.{l}.<hook>``."""
POSITIONS: tuple[str, ...] = ("all", "prompt", "answer", "last")


def check_site(site: str) -> str:
    """Return ``site`` if it is a known MLP site, else raise a ValueError naming the choices."""
    if isinstance(site, bool) or site not in SITES:
        raise ValueError(
            f"Unknown site {site!r}. Choose one of {sorted(SITES)}: 'pre' is "
            "blocks.L.mlp.hook_pre (pre-activation), 'key' is blocks.L.mlp.hook_post (key vector)."
        )
    return site


def check_positions(positions: str) -> str:
    """Return ``positions`` if known, else raise a ValueError naming the choices."""
    if isinstance(positions, bool) or positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}. Choose one of {list(POSITIONS)}.")
    return positions


def mlp_output_hook(model, layer: int) -> str:
    """The hook point of the MLP's own output at ``layer``: ``key @ W_out + b_out``.

    ``blocks.{l}.mlp.hook_out`` where the model has it (a TransformerBridge), else
    ``blocks.{l}.hook_mlp_out``. They differ where a norm follows the MLP (Gemma 2 and 3's
    ``post_feedforward_layernorm``, OLMo 2's): the bridge's ``hook_mlp_out`` fires after that
    norm, so an edit of ``W_out`` acts at ``mlp.hook_out``, not there. Elsewhere both names are
    one hook point.
    """
    name = f"blocks.{layer}.mlp.hook_out"
    return name if name in getattr(model, "hook_dict", {}) else hook_name("mlp_out", layer)


def hook_name(site: str, layer: int) -> str:
    """TransformerLens hook name of ``site`` at ``layer``.

    Example:
        >>> hook_name("pre", 3)
        'blocks.3.mlp.hook_pre'
        >>> hook_name("mlp_out", 3)
        'blocks.3.hook_mlp_out'
    """
    if site in BLOCK_SITES:
        return f"blocks.{layer}.{BLOCK_SITES[site]}"
    return f"blocks.{layer}.mlp.{SITES[check_site(site)]}"
