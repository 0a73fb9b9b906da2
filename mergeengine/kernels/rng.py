"""Seeded randomness per (recipe seed, step, tensor): reproducible and independent of order.

Each tensor of each step gets its own generator, seeded from a SHA-256 hash of the recipe seed,
the step id and the tensor name. So a tensor's random draws do not depend on which tensors were
processed before it, on parallelism, or on resuming a half-finished run, and two steps (or two
tensors) never share a stream by accident.

Streams are reproducible per device type: the CPU and CUDA generators are different algorithms,
so the same seed gives different draws on ``"cpu"`` and ``"cuda"``.
"""

from __future__ import annotations

import hashlib
import json

import torch

# Seeds are kept to 63 bits: every torch generator accepts them, on every device.
_SEED_BITS = 63


def derive_seed(seed: int, step_id: str, tensor_name: str) -> int:
    """The 63-bit seed of one (recipe seed, step, tensor) triple.

    The triple is encoded as the compact JSON array ``[seed, step_id, tensor_name]`` (UTF-8), so
    distinct triples never encode alike (``("a.b", "c")`` vs ``("a", "b.c")``), then hashed with
    SHA-256; the first 8 bytes, little-endian, with the top bit cleared, are the seed. The value is
    stable across Python versions, platforms and runs (no ``hash()`` randomisation).

    Args:
        seed: the recipe's integer seed (any size, may be negative).
        step_id: id of the recipe step.
        tensor_name: name of the tensor in the checkpoint.

    Returns:
        An int in ``[0, 2**63)``.

    Raises:
        TypeError: when ``seed`` is not an int or the names are not strings.

    Example:
        >>> derive_seed(0, "dare", "model.layers.0.mlp.up_proj.weight") == derive_seed(
        ...     0, "dare", "model.layers.0.mlp.up_proj.weight")
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(step_id, str) or not isinstance(tensor_name, str):
        raise TypeError("step_id and tensor_name must be strings")
    payload = json.dumps([seed, step_id, tensor_name], ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << _SEED_BITS) - 1)


def tensor_generator(
    seed: int, step_id: str, tensor_name: str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` for one tensor of one step, seeded by :func:`derive_seed`.

    Args:
        seed: the recipe's integer seed.
        step_id: id of the recipe step.
        tensor_name: name of the tensor in the checkpoint.
        device: device of the generator; it must match the device of the tensors it draws for.

    Returns:
        A new generator; calling this again with the same arguments gives the same stream.

    Raises:
        TypeError: when ``seed`` is not an int or the names are not strings.

    Example:
        >>> g = tensor_generator(42, "dare_step", "model.layers.0.self_attn.q_proj.weight")
        >>> torch.rand(2, generator=g).shape
        torch.Size([2])
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, step_id, tensor_name))
    return generator
