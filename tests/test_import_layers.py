"""Imports flow one way (docs/architecture.md): every ``import`` of the repository's own packages,
the ones inside functions included, read from the source with ``ast`` and checked against the
table of what each layer may import."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAY_IMPORT = {
    "models": set(),
    "transfer.curve": set(),
    "transfer": {"transfer.curve"},
    "mmserve.rpc": set(),
    "mmserve.core": {"transfer.curve"},
    "mmserve.distributed": {"models", "mmserve.core", "transfer.curve"},
    "mmserve.engine": {"models", "mmserve.core", "mmserve.distributed"},
    "mmserve.llm": {"models", "mmserve.core", "mmserve.engine"},
    "mmserve.serving": {"models", "mmserve.core", "mmserve.distributed", "mmserve.engine"},
    "mmserve.roles": {"models", "transfer", "transfer.curve", "mmserve.core", "mmserve.distributed", "mmserve.engine",
                      "mmserve.rpc", "mmserve.serving"},
    "mmserve.serving.cli": {"models", "transfer", "transfer.curve", "mmserve.core", "mmserve.distributed", "mmserve.engine",
                            "mmserve.rpc", "mmserve.serving", "mmserve.roles"},
}
"""Each layer may import itself and the layers named here. ``mmserve.core`` is the plain modules at
the top of ``mmserve/`` (sampling params, sampler, stop strings, KV page manager, cluster
credential); ``mmserve.llm`` is the offline ``LLM`` and the package's face; ``serving.cli`` is
``serve.py``'s command line, the one module above the roles. ``transfer.curve`` (CurveZMQ keys and
sockets, a leaf that imports nothing of the repository) serves every ZMQ surface: the transfer
layer's, the KV events' and the lockstep's."""

SUBPACKAGES = ("rpc", "distributed", "engine", "serving", "roles")


def layer(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not the repository's)."""
    parts = module.split(".")
    if parts[:2] == ["transfer", "curve"]:
        return "transfer.curve"
    if parts[0] in ("models", "transfer"):
        return parts[0]
    if parts[0] != "mmserve":
        return None
    if parts[1:3] == ["serving", "cli"]:
        return "mmserve.serving.cli"
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return f"mmserve.{parts[1]}"
    return "mmserve.llm" if parts[1:] in ([], ["llm"], ["__init__"]) else "mmserve.core"


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    sources = [p for package in ("models", "transfer", "mmserve") for p in (REPO / package).rglob("*.py")]
    assert len(sources) > 50
    for path in sources:
        here = layer(_module_name(path))
        for module in imported_modules(path):
            there = layer(module)
            if there is not None and there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{path.relative_to(REPO)} ({here}) imports {module} ({there})")
    assert not wrong, "\n".join(wrong)


def test_models_know_nothing_of_serving_and_transfer_nothing_of_models():
    assert MAY_IMPORT["models"] == MAY_IMPORT["transfer.curve"] == set()
    assert MAY_IMPORT["transfer"] == {"transfer.curve"}
    assert layer("models.qwen3_vl_moe.model") == "models" and layer("transfer.sender") == "transfer"
