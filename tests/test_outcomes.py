"""Per-document outcomes (`TaskScore.outcomes`): what lm-eval scored each document, kept by
both engines and by the result cache, so two evaluations of the same documents compare
pairwise.

Tiny random models score small tasks written here (multiple choice with an index label
and with a text label, some choices non-ASCII; WinoGrande-style partial scoring; a
LAMBADA-style last-word task) and, where the benchmark data is present, the shipped
`local_*` tasks. Each document's acc and acc_norm must follow from its log-likelihoods
as lm-eval defines them, their means must be the task scores, the fast engine must give
the lm-eval path's outcomes, and cache entries from before outcomes existed must be
recomputed.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
from tiny import byte_tokenizer, tiny_model

import prune.evaluate.cache as cache_mod
from prune.evaluate.cache import ResultCache, model_fingerprint
from prune.evaluate.harness import LmEvalRunner
from prune.evaluate.removals import evaluate_removals
from prune.evaluate.settings import DocOutcomes, EvalSettings, TaskScore

WORDS = "the cat dog sat on a mat red blue green house tree river stone bird sings".split()
ODD = ("café", "naïve bird", "über tree", "señor cat")  # characters != UTF-8 bytes

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/mc.jsonl"
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_target: {target}
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PARTIAL_YAML = """task: o_partial
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/partial.jsonl"
output_type: multiple_choice
test_split: test
doc_to_text: gold
doc_to_target: continuation
doc_to_choice: context_options
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
LAST_YAML = """task: o_last
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/last.jsonl"
output_type: loglikelihood
test_split: test
doc_to_text: context
doc_to_target: "{{{{' ' + continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TASKS = ("o_mc", "o_mc_text", "o_partial", "o_last")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("outcome_tasks")
    rng = random.Random(7)
    mc = []
    for i in range(16):
        choices = list(dict.fromkeys(_sentence(rng, 1, 4) for _ in range(rng.choice((2, 3, 4)))))
        if len(choices) < 2:
            choices.append("stone river bird")
        if i % 3 == 0:
            choices[rng.randrange(len(choices))] = ODD[i % len(ODD)]
        gold = rng.randrange(len(choices))
        mc.append(
            {
                "query": "Question: " + _sentence(rng, 3, 10) + "?",
                "choices": choices,
                "gold": gold,
                "answer": choices[gold],
            }
        )
    _write_jsonl(root / "mc.jsonl", mc)
    partial = []
    for _ in range(8):
        start = _sentence(rng, 2, 6)
        partial.append(
            {
                "context_options": [
                    f"{start} {rng.choice(WORDS)}",
                    f"{start} {_sentence(rng, 2, 3)}",
                ],
                "continuation": _sentence(rng, 2, 5) + ".",
                "gold": rng.randrange(2),
            }
        )
    _write_jsonl(root / "partial.jsonl", partial)
    last = [{"context": _sentence(rng, 3, 10), "continuation": rng.choice(WORDS)} for _ in range(8)]
    _write_jsonl(root / "last.jsonl", last)
    (root / "o_mc.yaml").write_text(MC_YAML.format(name="o_mc", root=root, target="gold"))
    (root / "o_mc_text.yaml").write_text(
        MC_YAML.format(name="o_mc_text", root=root, target="answer")
    )
    (root / "o_partial.yaml").write_text(PARTIAL_YAML.format(root=root))
    (root / "o_last.yaml").write_text(LAST_YAML.format(root=root))
    return root


def _docs(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def _assert_lm_eval_definitions(scores: dict[str, TaskScore]) -> None:
    """acc = argmax(lls) == gold, acc_norm = argmax(lls / choice_lengths) == gold, per document;
    the mean of each mean-aggregated metric is the task score."""
    for name, score in scores.items():
        out = score.outcomes
        assert out is not None, name
        assert len(out.doc_ids) == score.n and out.doc_ids == sorted(out.doc_ids), name
        multiple_choice = all(g is not None for g in out.gold)
        for i, (lls, gold, lengths) in enumerate(
            zip(out.lls, out.gold, out.choice_lengths, strict=True)
        ):
            if multiple_choice:
                assert len(lls) == len(lengths) >= 2, (name, i)
                assert out.values["acc"][i] == float(_argmax(lls) == gold), (name, i)
                if "acc_norm" in out.values:
                    norm = [ll / n for ll, n in zip(lls, lengths, strict=True)]
                    assert out.values["acc_norm"][i] == float(_argmax(norm) == gold), (name, i)
            else:
                assert gold is None and len(lls) == 1 and len(lengths) == 1, (name, i)
                assert out.values["acc"][i] in (0.0, 1.0)
        if score.metric in ("acc", "acc_norm"):
            values = out.values[score.metric]
            assert sum(values) / len(values) == pytest.approx(score.value, abs=1e-12), name
            assert out.metric(score.metric) == dict(zip(out.doc_ids, values, strict=True))


def test_outcomes_follow_lm_eval_definitions(task_dir):
    model, tok = tiny_model("llama", 3, seed=0), byte_tokenizer()
    settings = EvalSettings(tasks=TASKS, include_path=str(task_dir))
    runner = LmEvalRunner(model, tok, settings)
    by_acc = runner.run(task_metric="acc")
    by_norm = runner.run(["o_mc", "o_mc_text"], task_metric="acc_norm")
    _assert_lm_eval_definitions(by_acc)
    _assert_lm_eval_definitions(by_norm)
    assert by_norm["o_mc"].outcomes == by_acc["o_mc"].outcomes  # the metric picks the score only

    mc = _docs(task_dir / "mc.jsonl")
    for name in ("o_mc", "o_mc_text"):  # an index label and a text label give the same gold
        out = by_acc[name].outcomes
        assert out.gold == [d["gold"] for d in mc]
        # acc_norm divides by the choice's length in characters (lm-eval's len(choice)),
        # without the " " delimiter; "café" counts 4, not its 5 UTF-8 bytes.
        assert out.choice_lengths == [[len(c) for c in d["choices"]] for d in mc]
        assert set(out.values) == {"acc", "acc_norm"}
    assert any(len(c) != len(c.encode()) for d in mc for c in d["choices"])

    partial = by_acc["o_partial"].outcomes  # gold from doc_to_text, choices are the contexts
    docs = _docs(task_dir / "partial.jsonl")
    assert partial.gold == [d["gold"] for d in docs]
    assert partial.choice_lengths == [[len(c) for c in d["context_options"]] for d in docs]
    assert set(partial.values) == {"acc"}

    last = by_acc["o_last"].outcomes  # loglikelihood task: one request, acc = is greedy
    docs = _docs(task_dir / "last.jsonl")
    assert last.gold == [None] * len(docs)
    assert last.choice_lengths == [[len(" " + d["continuation"])] for d in docs]
    assert last.values["perplexity"] == [lls[0] for lls in last.lls]  # per document: its ll


def _close_calls(out: DocOutcomes, tolerance: float = 1e-3) -> set[int]:
    """Positions of documents whose best two choices, raw or length-normalised, are within
    `tolerance` (float rounding may order them either way)."""
    close = set()
    for i, (lls, lengths) in enumerate(zip(out.lls, out.choice_lengths, strict=True)):
        for xs in (lls, [ll / n for ll, n in zip(lls, lengths, strict=True)]):
            top = sorted(xs, reverse=True)
            if len(top) > 1 and top[0] - top[1] <= tolerance:
                close.add(i)
    return close


def _assert_same_outcomes(a: DocOutcomes, b: DocOutcomes, where) -> int:
    """The same documents, gold and divisors, log-likelihoods within float tolerance, and the
    same decisions wherever no two choices tie; returns the number of decisions compared."""
    assert (a.doc_ids, a.gold, a.choice_lengths) == (b.doc_ids, b.gold, b.choice_lengths), where
    assert a.values.keys() == b.values.keys(), where
    for x, y in zip(a.lls, b.lls, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-4), where
    close = _close_calls(a) | _close_calls(b)
    compared = 0
    for name in a.values:
        if name == "perplexity":  # a log-likelihood, not a decision
            assert a.values[name] == pytest.approx(b.values[name], rel=1e-5, abs=1e-4), where
            continue
        for i, (x, y) in enumerate(zip(a.values[name], b.values[name], strict=True)):
            if i not in close:
                assert x == y, (where, name, a.doc_ids[i])
                compared += 1
    return compared


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_fast_engine_gives_the_lm_eval_outcomes(task_dir, model_type):
    loaded = SimpleNamespace(
        model=tiny_model(model_type, 4, seed=1), tokenizer=byte_tokenizer(), source=None
    )
    settings = EvalSettings(tasks=TASKS, include_path=str(task_dir))
    candidates = [(), (0,), (2,), (1, 3)]
    fast = evaluate_removals(loaded, settings, candidates, engine="fast", progress=False)
    slow = evaluate_removals(loaded, settings, candidates, engine="lm-eval", progress=False)
    for cand, f, s in zip(candidates, fast, slow, strict=True):
        assert f.keys() == s.keys() == set(TASKS)
        for name in f:
            # This data has no float ties, so every decision must be the same.
            assert not _close_calls(s[name].outcomes), (cand, name)
            _assert_same_outcomes(f[name].outcomes, s[name].outcomes, (cand, name))
            assert replace(f[name], outcomes=None) == replace(s[name], outcomes=None)
        _assert_lm_eval_definitions(f)


def test_local_tasks_keep_outcomes_on_both_engines(data_dir):
    """The shipped tasks: ARC (acc, acc_norm), WinoGrande (partial), LAMBADA (last word)."""
    loaded = SimpleNamespace(
        model=tiny_model("llama", 3, seed=2), tokenizer=byte_tokenizer(), source=None
    )
    tasks = ("local_arc_easy", "local_winogrande", "local_lambada")
    settings = EvalSettings(tasks=tasks, limit=24, data_dir=str(data_dir))
    candidates = [(), (1,)]
    fast = evaluate_removals(loaded, settings, candidates, engine="fast", progress=False)
    slow = evaluate_removals(loaded, settings, candidates, engine="lm-eval", progress=False)
    compared = 0
    for cand, f, s in zip(candidates, fast, slow, strict=True):
        _assert_lm_eval_definitions(s)
        for name in tasks:
            assert s[name].outcomes.doc_ids == list(range(24))
            compared += _assert_same_outcomes(f[name].outcomes, s[name].outcomes, (cand, name))
    assert compared >= 170  # of 2 x 24 x 4 decisions (ARC acc, acc_norm; WinoGrande; LAMBADA)
    assert set(slow[0]["local_arc_easy"].outcomes.values) == {"acc", "acc_norm"}
    assert slow[0]["local_lambada"].outcomes.gold == [None] * 24


def test_outcomes_round_trip_through_the_cache(task_dir, tmp_path):
    loaded = SimpleNamespace(
        model=tiny_model("llama", 3, seed=3), tokenizer=byte_tokenizer(), source=None
    )
    settings = EvalSettings(tasks=("o_mc", "o_last"), include_path=str(task_dir))
    cache = ResultCache(tmp_path)
    first = evaluate_removals(loaded, settings, [(), (1,)], engine="fast", cache=cache)
    entries = sorted(tmp_path.rglob("*.json"))
    assert len(entries) == 4
    for path in entries:
        data = json.loads(path.read_text())
        assert data["version"] == cache_mod.CACHE_VERSION
        assert data["score"]["outcomes"]["lls"]
    again = evaluate_removals(loaded, settings, [(), (1,)], engine="fast", cache=cache)
    assert again == first  # outcomes included, read back from disk
    score = first[1]["o_mc"]
    assert TaskScore.from_dict(json.loads(json.dumps(score.to_dict()))) == score


def test_entries_from_before_outcomes_are_recomputed(task_dir, tmp_path, monkeypatch):
    loaded = SimpleNamespace(
        model=tiny_model("llama", 3, seed=3), tokenizer=byte_tokenizer(), source=None
    )
    settings = EvalSettings(tasks=("o_mc",), include_path=str(task_dir))
    cache = ResultCache(tmp_path)
    fingerprint = model_fingerprint(loaded)
    new_key = cache.key(fingerprint, (), "o_mc", settings, "fast")
    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "CACHE_VERSION", 1)
        old_key = cache.key(fingerprint, (), "o_mc", settings, "fast")
    assert old_key != new_key  # a version-1 entry is not even looked up
    # A version-1 entry (no version field, no outcomes), even where the new key points.
    stale = {"task": "o_mc", "metric": "acc", "value": 0.123, "stderr": 0.01, "n": 16}
    for key in (old_key, new_key):
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        cache.path(key).write_text(json.dumps({"score": stale, "meta": {}}))
    assert cache.get(new_key) is None
    (score,) = evaluate_removals(loaded, settings, [()], engine="fast", cache=cache)
    assert score["o_mc"].value != 0.123 and score["o_mc"].outcomes is not None
    assert cache.get(new_key) == score["o_mc"]  # the stale entry was replaced


def test_plain_numbers_and_malformed_outcomes_in_the_cache(tmp_path):
    """A perplexity stored as a TaskScore has no outcomes and reads back as before; outcomes
    whose lists disagree in length make the entry corrupt (read as missing)."""
    cache = ResultCache(tmp_path)
    plain = TaskScore("ppl", "perplexity", 12.5, None, 8, False)
    cache.put("plain", plain)
    assert cache.get("plain") == plain and cache.get_value("plain") == 12.5
    assert json.loads(cache.path("plain").read_text())["score"]["outcomes"] is None

    out = DocOutcomes(
        [0, 1], {"acc": [1.0, 0.0]}, [[-1.0, -2.0], [-3.0, -1.0]], [0, 0], [[1, 2], [2, 1]]
    )
    assert out.metric("acc") == {0: 1.0, 1: 0.0}
    with pytest.raises(KeyError, match="acc_norm.*there are: acc"):
        out.metric("acc_norm")
    cache.put("bad", replace(plain, outcomes=out))
    data = json.loads(cache.path("bad").read_text())
    data["score"]["outcomes"]["gold"] = [0]
    cache.path("bad").write_text(json.dumps(data))
    assert cache.get("bad") is None
    with pytest.raises(ValueError, match="gold"):
        DocOutcomes([0, 1], {}, [[0.0], [0.0]], [None], [[1], [1]])
