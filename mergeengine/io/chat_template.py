"""Chat templates for a save step's ``chat_template``: a named format, ``auto``, or a Jinja string.

The template is written into the output's ``tokenizer_config.json`` (``chat_template``); a
``chat_template.jinja``/``.json`` copied from the origin model is removed, since transformers
would prefer it.

``auto`` takes the template most of the input models carry (their ``chat_template.jinja`` or
``tokenizer_config.json``), the first in recipe order on a tie, and leaves the origin's files as
they are when no input has one (as mergekit does).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergeengine.errors import ModelError
from mergeengine.io.checkpoint import Checkpoint

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral chat: only user and assistant messages') }}{% endif %}"
    "{% endfor %}"
)
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA}
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_chat_template(value: str) -> str:
    """A save step's ``chat_template``: ``auto``, a known name, or a Jinja template.

    Raises:
        ValueError: neither (mergekit's rule: a template holds ``{`` and is at least 20 characters).
    """
    if value == "auto" or value in NAMED or ("{" in value and len(value) >= 20):
        return value
    raise ValueError(f"'{value}' is not a chat template: use auto, {', '.join(NAMED)}, or a Jinja template string")


def template_of(ckpt: Checkpoint) -> str | None:
    """The chat template a model folder carries (``chat_template.jinja`` first), stripped; None if none."""
    folder = getattr(ckpt, "folder", None) or getattr(getattr(ckpt, "base", None), "folder", None)
    if folder is None:
        return None
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    cfg = Path(folder) / "tokenizer_config.json"
    try:
        template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    except json.JSONDecodeError:
        return None
    if isinstance(template, list):  # transformers' named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str, inputs: list[Checkpoint]) -> str | None:
    """The template text ``value`` names (None: ``auto`` found none among ``inputs``)."""
    if value == "auto":
        found = [t for t in (template_of(c) for c in inputs) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(value, value)


def write_chat_template(folder: Path, template: str) -> None:
    """Put ``template`` into ``folder``'s tokenizer_config.json (created if absent).

    Raises:
        ModelError: the existing tokenizer_config.json is not a JSON object.
    """
    cfg_path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ModelError(f"tokenizer_config.json is not valid JSON: {exc}", file=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise ModelError("tokenizer_config.json is not a JSON object", file=str(cfg_path))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    for name in TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
