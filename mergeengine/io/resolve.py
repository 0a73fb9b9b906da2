"""Turn a load step's ``model`` string into an opened :class:`Checkpoint`."""

from __future__ import annotations

from pathlib import Path

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import Checkpoint


def open_checkpoint(model: str, *, base_dir: Path, revision: str | None = None) -> Checkpoint:
    """Open the model a load step names.

    Args:
        model: a local folder, a ``.safetensors`` file, or a ``.gguf`` file; relative paths are
            resolved against ``base_dir`` (the recipe's folder).
        base_dir: folder relative paths are resolved against.
        revision: hub revision (hub ids only).

    Returns:
        The opened checkpoint (headers read, no tensor data).

    Raises:
        ModelError: the model cannot be found or read.
    """
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError("GGUF file not found", file=str(path))
        from mergeengine.io.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.exists():
        from mergeengine.io.safetensors_reader import SafetensorsCheckpoint

        return SafetensorsCheckpoint(path)
    raise ModelError("model not found: no such file or folder", file=str(path))
