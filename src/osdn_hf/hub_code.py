"""Copy the modelling code into a checkpoint folder, so it loads with `trust_remote_code=True`.

transformers loads remote code from one flat folder and follows only `from .name import`
lines, so the package's files are written flat: `layers/osdn_attention.py` becomes
`layers_osdn_attention.py` and every relative import is rewritten to match. Run from such a
flat folder (a model loaded as remote code), the same rewrite is the identity.
"""

from __future__ import annotations

import re
from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "configuration_osdn.OSDNConfig",
    "AutoModel": "modeling_osdn.OSDNModel",
    "AutoModelForCausalLM": "modeling_osdn.OSDNForCausalLM",
    "AutoModelForSequenceClassification": "modeling_osdn.OSDNForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_osdn.OSDNForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_osdn.OSDNForQuestionAnswering",
}
ROOT_MODULES = ("configuration_osdn", "modeling_osdn")
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\b)", flags=re.MULTILINE)


def _resolve(module: str, dots: str, name: str) -> str:
    """Package-relative module name that `from <dots><name> import` in `module` refers to."""
    parts = module.split(".")[: -len(dots)] + ([name] if name else [])
    if not parts or not all(parts):
        raise ValueError(f"cannot resolve `from {dots}{name} import` in {module}")
    return ".".join(parts)


def _flat(module: str) -> str:
    return module.replace(".", "_")


def flat_sources() -> dict[str, str]:
    """`{flat file name: source}` of every module the model needs, imports rewritten."""
    package_dir = Path(__file__).resolve().parent
    sources, todo = {}, list(ROOT_MODULES)
    while todo:
        module = todo.pop()
        if _flat(module) + ".py" in sources:
            continue
        path = package_dir.joinpath(*module.split(".")).with_suffix(".py")
        if not path.is_file():
            raise ValueError(f"module {module} of the model code is not a file: {path}")
        text = path.read_text(encoding="utf-8")

        def rewrite(match: re.Match, module: str = module) -> str:
            target = _resolve(module, match.group(2), match.group(3))
            todo.append(target)
            return f"{match.group(1)}.{_flat(target)}{match.group(4)}"

        sources[_flat(module) + ".py"] = _RELATIVE_IMPORT.sub(rewrite, text)
    return sources


def write_code(folder: str | Path) -> list[str]:
    """Write the flat modelling code into `folder`; return the file names written."""
    sources = flat_sources()
    for name, text in sources.items():
        Path(folder, name).write_text(text, encoding="utf-8")
    return sorted(sources)
