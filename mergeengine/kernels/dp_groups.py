"""Which tensors DP prunes, and the modules it computes its statistics on.

A DP *module* is one linear weight of a decoder layer: a 2-D tensor (``model.layers.3.mlp.up_proj.weight``,
or one expert of the per-expert MoE layout, ``model.layers.3.block_sparse_moe.experts.5.w1.weight``),
or one expert's slice ``[e]`` of a 3-D fused expert tensor ``[E, ...]`` (``model.layers.3.mlp.experts.
gate_up_proj`` [E, 2I, H] and ``...down_proj`` [E, H, I], the layout transformers 5 and mergekit write
for Mixtral, and GPT-OSS's). A module's key is its tensor name, with ``[e]`` appended for a slice, so
the same weights give the same statistics and densities in either layout.

Not prunable (dense): tensors without a layer index (embeddings, lm_head), 1-D tensors (norms,
biases), biases of any shape (``.bias``, GPT-OSS's 2-D ``experts.gate_up_proj_bias``), MoE routers
(a module whose last name segment is ``gate`` or ``router`` or ends in ``_gate``: Mixtral's and
Qwen-MoE's ``mlp.gate``, GPT-OSS's ``mlp.router``, Qwen-MoE's ``shared_expert_gate``), and 3-D
tensors outside an ``experts`` block.

Example:
    >>> g = dp_module_groups({"model.layers.0.mlp.experts.down_proj": (2, 4, 3), "model.layers.0.mlp.gate.weight": (2, 4)})
    >>> g.units
    {'model.layers.0.mlp.experts.down_proj[0]': ('model.layers.0', 'mlp.experts.down_proj[0]'), \
'model.layers.0.mlp.experts.down_proj[1]': ('model.layers.0', 'mlp.experts.down_proj[1]')}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

# First all-digit dotted segment: model.layers.3.mlp..., transformer.h.3.attn..., blocks.3...
_LAYER_INDEX = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?)(?P<index>\d+)\.(?P<rest>.+)$")

Delta = Union["torch.Tensor", tuple["torch.Tensor", "torch.Tensor"]]  # noqa: UP007 - a string alias: no torch at import


@dataclass(frozen=True)
class DPGroups:
    """DP's modules and the tensors they live in.

    Attributes:
        units: module key -> (layer key, module name), ordered by layer prefix, layer index
            numerically, then input order (a fused tensor's slices in expert order). This is the
            ``groups`` argument of :func:`~mergeengine.kernels.dp_density.dp_densities`.
        slices: prunable tensor name -> its module keys: ``[name]`` for a 2-D weight, one key per
            expert for a 3-D fused expert tensor.
    """

    units: dict[str, tuple[str, str]]
    slices: dict[str, list[str]]

    @property
    def fused(self) -> list[str]:
        """The 3-D tensors whose slices are modules."""
        return [name for name, keys in self.slices.items() if keys != [name]]


def is_dense_by_name(name: str, module: str) -> bool:
    """Biases and MoE routers, which DP leaves dense whatever their shape."""
    if name.endswith("bias"):  # .bias, and GPT-OSS's 2-D experts.*_proj_bias
        return True
    last = module.rsplit(".", 1)[-1]
    return last in ("gate", "router") or last.endswith("_gate")


def _prunable(name: str, shape: tuple[int, ...]) -> tuple[str, int, str] | None:
    """``(prefix, index, module)`` of a prunable tensor, else None."""
    if len(shape) not in (2, 3):
        return None
    match = _LAYER_INDEX.match(name)
    if match is None:
        return None
    rest = match.group("rest")
    module = rest[: -len(".weight")] if rest.endswith(".weight") else rest
    if is_dense_by_name(name, module):
        return None
    if len(shape) == 3 and "experts" not in module.split("."):
        return None
    return match.group("prefix"), int(match.group("index")), module


def dp_module_groups(tensors: Mapping[str, Sequence[int]]) -> DPGroups:
    """DP's modules of a model, from its tensor names and shapes (see the module docstring).

    Args:
        tensors: tensor name -> shape, e.g. from checkpoint headers.

    Returns:
        A :class:`DPGroups`; the layer key is the name up to the layer index (``model.layers.3``),
        the module name the rest without ``.weight`` (``self_attn.q_proj``, ``mlp.experts.down_proj[5]``).
    """
    found: list[tuple[str, int, int, str, str, int]] = []
    for position, (name, shape) in enumerate(tensors.items()):
        shape = tuple(shape)
        parsed = _prunable(name, shape)
        if parsed is not None:
            prefix, index, module = parsed
            found.append((prefix, index, position, name, module, shape[0] if len(shape) == 3 else -1))
    found.sort(key=lambda item: (item[0], item[1], item[2]))
    units: dict[str, tuple[str, str]] = {}
    slices: dict[str, list[str]] = {}
    for prefix, index, _, name, module, experts in found:
        layer = f"{prefix}{index}"
        if experts < 0:
            units[name] = (layer, module)
            slices[name] = [name]
            continue
        slices[name] = [f"{name}[{e}]" for e in range(experts)]
        for e, key in enumerate(slices[name]):
            units[key] = (layer, f"{module}[{e}]")
    return DPGroups(units, slices)


def unit_deltas(delta: Delta, keys: Sequence[str]) -> list[tuple[str, Delta]]:
    """``(module key, its delta)`` for each module of one tensor: the tensor itself, or its expert slices.

    ``delta`` may be a ``(model, base)`` pair (then so is each slice); slices are views, no copy.
    """
    if len(keys) == 1 and not keys[0].endswith("]"):
        return [(keys[0], delta)]
    if isinstance(delta, tuple):
        return [(key, (delta[0][e], delta[1][e])) for e, key in enumerate(keys)]
    return [(key, delta[e]) for e, key in enumerate(keys)]


def grouping_notes(groups: DPGroups, total: int) -> list[str]:
    """What ``plan`` shows of the grouping: modules per layer, fused expert tensors, what stays dense."""
    if not groups.units:
        return ["no decoder linear weights found: every tensor passes through dense"]
    layers = sorted({layer for layer, _ in groups.units.values()})
    modules = sorted({re.sub(r"\[\d+\]$", "[e]", m) for _, m in groups.units.values()})
    notes = [
        f"decoder linear weights: {len(groups.slices)} tensors in {len(layers)} layers "
        f"(modules: {', '.join(modules)}); {total - len(groups.slices)} other tensors dense"
    ]
    fused = groups.fused
    if fused:
        experts = sorted({len(groups.slices[n]) for n in fused})
        notes.append(f"fused experts: {len(fused)} 3-D tensors with {'/'.join(map(str, experts))} experts each; "
                     f"each expert slice [e] is one DP module ({len(groups.units)} modules in all)")
    return notes


def apply_units(
    delta: Delta, keys: Sequence[str], transform: Callable[[Delta, str], torch.Tensor]
) -> torch.Tensor:
    """``transform(module delta, module key)`` on each module of one tensor, reassembled in its shape.

    A 2-D weight is one module (``transform`` gets the whole delta); a fused expert tensor's
    expert results are stacked along dimension 0.
    """
    parts = unit_deltas(delta, keys)
    if len(parts) == 1 and parts[0][0] == keys[0] and not keys[0].endswith("]"):
        return transform(delta, keys[0])
    return torch.stack([transform(sub, key) for key, sub in parts])
