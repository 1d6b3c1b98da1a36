"""The plan's ``chat_template``: ``auto`` (the template most of the inputs carry), a name mergekit 0.1.5 accepts
(``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``), or a literal Jinja template. The result is stored
in the merged model's ``tokenizer_config.json`` as text; mergescope never renders it.

The named templates below are mergescope's own renderings of those public prompt formats (the text differs
from mergekit's files; the prompts they produce follow the same format).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def chat_template_problem(value: str) -> str | None:
    """Why ``value`` is no valid ``chat_template`` setting, None when it is (``auto``, a name, or Jinja: at
    least 20 characters with a ``{``, as mergekit requires)."""
    if value == "auto" or value in NAMED_TEMPLATES or (len(value) >= 20 and "{" in value):
        return None
    return (f"chat_template {value!r} is neither auto, a known name ({', '.join(sorted(NAMED_TEMPLATES))}) "
            "nor a Jinja template")


def template_of(folder_files: list[Path]) -> str | None:
    """A model's chat template: ``chat_template.jinja``, else ``chat_template.json``, else the
    ``chat_template`` of ``tokenizer_config.json`` (of a list of named templates, the one named default)."""
    files = {p.name: p for p in folder_files}
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name in files:
            try:
                value = json.loads(files[name].read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, list):
                value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            if isinstance(value, str) and value:
                return value
    return None


def resolve_chat_template(value: str | None, inputs_files: list[list[Path]]) -> str | None:
    """The template text for the plan's setting: ``auto`` picks the most common of the inputs' templates
    (compared after stripping surrounding whitespace; the first seen wins a tie; None when no input has one)."""
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (template_of(files) for files in inputs_files) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(value, value)
