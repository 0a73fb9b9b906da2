"""Model card (``README.md``) and machine-readable provenance (``mergeengine.json``) for a merge.

``mergeengine.json`` is the recipe that produced the model plus a ``provenance`` key, so it can be
rerun as is (JSON is YAML): ``mergeengine run out/mergeengine.json --out DIR`` (a new folder: the
recipe's own folder is never overwritten).

Example:
    >>> write_model_card(Path("out"), recipe_name="math+code", recipe_yaml=text,
    ...                  base_models=["org/base"], methods=["ties"], provenance=prov)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from mergeengine.io.hub import looks_like_repo_id

LOG = logging.getLogger(__name__)

CARD_NAME = "README.md"
PROVENANCE_NAME = "mergeengine.json"


def _is_hub_id(model: str, inputs: dict[str, Any]) -> bool:
    """A model string is a hub id when provenance says it resolved to a hub commit (else: by its shape)."""
    seen = [p for p in inputs.values() if isinstance(p, dict) and p.get("model") == model]
    if seen:
        return any(p.get("resolved_revision") for p in seen)
    return looks_like_repo_id(model) and not Path(model).expanduser().exists()


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _dump_yaml(data: Any) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip(
        "\n"
    )


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy: paths, dtypes, tuples and other objects become strings or lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def front_matter(
    base_models: list[str], methods: list[str], inputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card's YAML metadata (what the hub indexes).

    Args:
        base_models: the models merged (recipe ``model`` strings); only hub ids are listed.
        methods: merge methods used, for tags.
        inputs: provenance inputs, to tell hub ids from local folders named like ``org/name``.

    Returns:
        ``{"base_model": [...] (omitted when no hub id), "library_name": "transformers", "tags": [...]}``.
    """
    inputs = inputs or {}
    hub_ids = list(dict.fromkeys(m for m in base_models if _is_hub_id(m, inputs)))
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = hub_ids
    meta["library_name"] = "transformers"
    meta["tags"] = list(dict.fromkeys(["mergeengine", "merge", *methods]))
    return meta


def render_model_card(
    *,
    recipe_name: str,
    recipe_yaml: str,
    base_models: list[str],
    methods: list[str],
    provenance: dict[str, Any],
) -> str:
    """The README.md text. See :func:`write_model_card`."""
    inputs: dict[str, Any] = provenance.get("inputs") or {}
    meta = front_matter(base_models, methods, inputs)
    lines = ["---", _dump_yaml(meta), "---", "", f"# {recipe_name}", ""]
    models = ", ".join(f"`{m}`" for m in dict.fromkeys(base_models)) or "(none)"
    how = ", ".join(f"`{m}`" for m in dict.fromkeys(methods)) or "no merge method (copy / transform only)"
    lines += [
        f"This model was merged with mergeengine "
        f"from the recipe below. Models merged: {models}. Methods: {how}.",
        "",
        "## Recipe",
        "",
    ]
    fence = _fence(recipe_yaml)
    lines += [f"{fence}yaml", recipe_yaml.rstrip("\n"), fence, ""]
    lines += ["## Provenance", ""]
    for key, label in (
        ("mergeengine_version", "mergeengine version"),
        ("seed", "seed"),
        ("device", "device"),
        ("created", "created"),
    ):
        if key in provenance:
            lines.append(f"- {label}: `{provenance[key]}`")
    lines.append("")
    if inputs:
        lines += ["### Inputs", ""]
        for step_id, inp in inputs.items():
            inp = inp or {}
            rev = inp.get("revision")
            resolved = inp.get("resolved_revision")
            where = f"revision `{rev or 'main'}` -> commit `{resolved}`" if resolved else "local files"
            lines.append(f"- `{step_id}`: `{inp.get('model', '?')}` ({where})")
            for name, sha in (inp.get("files") or {}).items():
                lines.append(f"  - `{name}` sha256 `{sha}`")
        lines.append("")
    steps = provenance.get("steps") or {}
    if steps:
        lines += ["### Resolved step parameters", "", "```yaml", _dump_yaml(steps), "```", ""]
    lines += [
        f"`{PROVENANCE_NAME}` holds the same information and reruns the merge: "
        f"`mergeengine run {PROVENANCE_NAME} --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def provenance_document(provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``mergeengine.json`` content: the runnable recipe plus ``provenance`` (everything else).

    Args:
        provenance: see :func:`write_model_card`.

    Returns:
        ``{**provenance["recipe"], "provenance": {all other keys}}``, JSON-safe.
    """
    recipe = dict(provenance.get("recipe") or {})
    recipe.pop("provenance", None)  # rerunning a rerun must not nest provenance
    rest = {k: v for k, v in provenance.items() if k != "recipe"}
    return _plain({**recipe, "provenance": rest})


def write_model_card(
    folder: Path,
    *,
    recipe_name: str,
    recipe_yaml: str,
    base_models: list[str],
    methods: list[str],
    provenance: dict[str, Any],
) -> None:
    """Write ``README.md`` (front matter, description, recipe, provenance) and ``mergeengine.json``.

    Args:
        folder: the output model folder (must exist).
        recipe_name: title of the card.
        recipe_yaml: the recipe text, shown verbatim.
        base_models: the recipe's model strings; hub ids go into ``base_model:``.
        methods: merge methods used (tags).
        provenance: ``{"mergeengine_version", "seed", "device", "created",
            "inputs": {load_step_id: checkpoint_provenance(...)}, "steps": {step_id: params},
            "recipe": runnable recipe dict}``.

    Raises:
        OSError: the files cannot be written.

    Example:
        The front matter of a merge of two hub models with TIES::

            ---
            base_model:
            - org/base
            - org/math
            library_name: transformers
            tags:
            - mergeengine
            - merge
            - ties
            ---
    """
    folder = Path(folder)
    card = render_model_card(
        recipe_name=recipe_name,
        recipe_yaml=recipe_yaml,
        base_models=base_models,
        methods=methods,
        provenance=provenance,
    )
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    doc = provenance_document(provenance)
    (folder / PROVENANCE_NAME).write_text(
        json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    LOG.debug("wrote %s and %s in %s", CARD_NAME, PROVENANCE_NAME, folder)
