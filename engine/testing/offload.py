"""A CPU memory cap that makes accelerate offload the later half of a model's decoder layers to disk."""

from __future__ import annotations

from pathlib import Path


def memory_for_half_the_layers(model: Path) -> int:
    """A CPU memory cap that holds the embeddings, the first half of the decoder layers and the buffer accelerate
    keeps for loading the largest offloaded layer: its `auto` map then sends the later layers to disk."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    with safe_open(str(model / "model.safetensors"), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = weights.get_tensor(name)
            sizes[name] = tensor.numel() * tensor.element_size()
    layer_bytes: dict[int, int] = {}
    for name, size in sizes.items():
        parts = name.split(".")
        if "h" in parts or "layers" in parts:
            number = int(parts[parts.index("h" if "h" in parts else "layers") + 1])
            layer_bytes[number] = layer_bytes.get(number, 0) + size
    first_half = sorted(layer_bytes)[: len(layer_bytes) // 2]
    embeddings = sum(size for name, size in sizes.items() if "emb" in name or "wte" in name or "wpe" in name)
    return embeddings + sum(layer_bytes[n] for n in first_half) + max(layer_bytes.values()) + 256
