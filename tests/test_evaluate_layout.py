"""The `prune.evaluate` package keeps its layering: the fast engine imports no lm-eval, no
submodule imports one above it, and the pieces
that moved (fallback, cache writes) behave as before."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import prune.evaluate
from prune.errors import FastEngineUnsupported, PruneError

PACKAGE = Path(prune.evaluate.__file__).parent
PRUNE = PACKAGE.parent


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _python(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PRUNE.parent
    )
    assert done.returncode == 0, done.stderr


def test_engine_imports_without_lm_eval():
    _python("import sys, prune.evaluate.engine; assert 'lm_eval' not in sys.modules")
    assert not any(m.split(".")[0] == "lm_eval" for m in _imported_modules(PACKAGE / "engine.py"))


def test_package_settings_and_cache_import_no_heavy_library():
    _python(
        "import sys, prune.evaluate, prune.evaluate.settings, prune.evaluate.cache\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    _python(
        "import sys, prune.evaluate\n"
        "loaded = [m for m in sys.modules if m.startswith('prune.evaluate.')]\n"
        "assert not loaded, loaded"
    )


def test_no_import_cycle_among_the_submodules():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {
            m.split(".")[2]
            for m in _imported_modules(PACKAGE / f"{name}.py")
            if m.startswith("prune.evaluate.") and m.split(".")[2] in modules
        }
        - {name}
        for name in modules
    }
    assert graph["settings"] == set() and graph["engine"] <= {"settings"}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
    higher = {"prune.compare", "prune.pipeline", "prune.cli", "prune.measures", "prune.report"}
    for path in PACKAGE.glob("*.py"):
        found = {m for m in _imported_modules(path) if any(m.startswith(h) for h in higher)}
        assert not found, f"{path.name} imports {found}"


def test_only_the_harness_touches_lm_eval_private_api():
    private = ("_encode_pair", "add_env_info", "get_git_commit_hash")
    users = sorted(
        str(p.relative_to(PRUNE.parent))
        for p in PRUNE.rglob("*.py")
        if any(name in p.read_text() for name in private)
    )
    assert users == ["prune/evaluate/harness.py"]


def test_fast_engine_unsupported_carries_its_reason():
    exc = FastEngineUnsupported("the fast engine cannot do this")
    assert isinstance(exc, PruneError)
    assert exc.reason == str(exc) == "the fast engine cannot do this"


def test_with_fallback_logs_the_reason_and_uses_lm_eval(caplog):
    from prune.evaluate.removals import with_fallback

    calls = []

    def call(engine):
        calls.append(engine)
        if engine == "fast":
            raise FastEngineUnsupported("this task generates text")
        return "scored"

    with caplog.at_level(logging.WARNING, logger="prune"):
        assert with_fallback(call) == "scored"
    assert calls == ["fast", "lm-eval"]
    assert "this task generates text: falling back to the lm-eval engine" in caplog.text


def test_unknown_engine_names_the_accepted_ones():
    from prune.defaults import ENGINES
    from prune.evaluate.removals import check_engine

    for engine in ENGINES:
        check_engine(engine)
    with pytest.raises(
        PruneError, match="unknown engine 'slow' \\(accepted: auto, fast, lm-eval\\)"
    ):
        check_engine("slow")


def test_cache_round_trip_leaves_no_temporaries_and_ignores_corruption(tmp_path):
    from prune.evaluate.cache import ResultCache
    from prune.evaluate.settings import EvalSettings, TaskScore

    cache = ResultCache(tmp_path)
    key = cache.key("model", [2, 1], "task", EvalSettings(tasks=("task",)), "fast")
    assert key == cache.key("model", (1, 2), "task", EvalSettings(tasks=("task",)), "fast")
    assert cache.get(key) is None
    score = TaskScore("task", "acc", 0.5, 0.1, 10)
    cache.put(key, score, {"removed": [1, 2]})
    assert cache.get(key) == score and cache.get_value(key) == 0.5
    assert json.loads(cache.path(key).read_text())["meta"] == {"removed": [1, 2]}
    cache.put_json("other", {"a": [1, 2]})
    assert cache.get_json("other") == {"a": [1, 2]}
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == sorted([f"{key}.json", "other.json"])  # no temporaries left behind
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None
    cache.path("other").write_text('{"score": {"task": "t"}}')
    assert cache.get("other") is None and cache.get_json("other") is None
