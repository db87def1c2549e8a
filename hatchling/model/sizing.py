"""Equal-size configs across architectures, so a comparison measures the architecture, not its size.

Each arch has one width whose parameter count is affine in it: gpt's SwiGLU ``mlp_hidden``, BDH's
``bdh.neurons`` and HOPE's ``hope.hidden``. `matched` counts the parameters at two widths (on the meta
device: nothing is allocated), solves for the reference's count and rounds to the nearest allowed width.
"""

from __future__ import annotations

import math

import torch

from hatchling.model.config import ModelConfig, for_arch

WIDTH: dict[str, tuple[str, ...]] = {"gpt": ("mlp_hidden",), "bdh": ("bdh", "neurons"), "hope": ("hope", "hidden")}


def count_params(model_cfg: dict | ModelConfig) -> int:
    """The parameter count of the model `model_cfg` builds, without allocating its weights."""
    from hatchling.model.hatchling import build_model

    with torch.device("meta"):
        return build_model(model_cfg).num_params()


def _with_width(cfg: dict, arch: str, width: int) -> dict:
    *section, name = WIDTH[arch]
    if not section:
        return {**cfg, name: width}
    return {**cfg, section[0]: {**cfg.get(section[0], {}), name: width}}


def matched(arch: str, reference: dict | ModelConfig, multiple: int = 1) -> dict:
    """The `arch` config (a dict for build_model) with the reference's shared fields (d_model,
    n_layers, heads, vocab, ...) and its own width set so its parameter count is the reference's,
    the width rounded to a multiple of `multiple` (BDH's neurons also stay even). Fields `arch` does not
    read (the reference's own section, the hybrid's KDA options and research switches) are left out; the
    reference's own arch returns the reference unchanged."""
    ref = reference.model_dump() if isinstance(reference, ModelConfig) else dict(reference)
    if ref.get("arch", "hybrid") == arch:
        return ref
    if arch not in WIDTH:
        raise ValueError(f"no width to match for arch {arch!r} (choose from {', '.join(WIDTH)})")
    target = count_params(ref)
    cfg = for_arch(arch, ref)
    base = ModelConfig(**cfg)
    if arch == "bdh":
        multiple = math.lcm(multiple, 2)               # RoPE over the neurons rotates pairs
    *section, name = WIDTH[arch]
    lo = getattr(getattr(base, section[0]) if section else base, name)
    at_lo, at_hi = count_params(_with_width(cfg, arch, lo)), count_params(_with_width(cfg, arch, lo + multiple))
    exact = lo + (target - at_lo) * multiple / (at_hi - at_lo)
    width = multiple * round(exact / multiple)
    if width < 1:
        raise ValueError(f"arch {arch!r} cannot be made as small as the reference ({target:,} parameters): "
                         f"its {'.'.join(WIDTH[arch])} would be {exact:.1f}")
    out = _with_width(cfg, arch, width)
    ModelConfig(**out)                          # a width below the field's minimum fails here, naming it
    return out
