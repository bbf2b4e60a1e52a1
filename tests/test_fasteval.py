"""The fast engine gives the lm-eval path's numbers, per request and per candidate.

Tiny random models (Llama, and Gemma 3 with sliding-window layers of width 4)
are scored on three small task types written here: multiple choice (acc and
acc_norm), WinoGrande-style partial scoring, and a LAMBADA-style last-token task
whose continuations are the full model's greedy next byte for about half of the
documents (so last-word accuracy is not trivially zero). For every single-layer
candidate, the full model and multi-layer candidates, each request's
log-likelihood and greedy flag and every task score must match what lm-eval's
HFLM computes with the blocks really removed; a difference in accuracy is only
allowed where two choices tie within float tolerance (counted and printed).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from tiny import CONFIGS, byte_tokenizer, tiny_model

from prune.errors import FastEngineUnsupported, PruneError
from prune.evaluate.cache import ResultCache
from prune.evaluate.engine import FastEngine, Request, attention_windows, plan_batches
from prune.evaluate.harness import FastEvaluator, LmEvalRunner, _without_env_info, close_calls
from prune.evaluate.removals import evaluate_removals
from prune.evaluate.settings import EvalSettings
from prune.surgery import layers_removed

MODEL_TYPES = ("llama", "gemma3_text")
WORDS = (
    "the cat dog sat on a mat red blue green house tree river stone bird sings loud quiet".split()
)

MC_YAML = """task: t_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/mc.jsonl"
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PARTIAL_YAML = """task: t_partial
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
LASTWORD_YAML = """task: t_last_{model_type}
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/last_{model_type}.jsonl"
output_type: loglikelihood
test_split: test
doc_to_text: context
doc_to_target: continuation
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models spend their time in thread synchronisation; one thread is several times
    # faster here, above all on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@torch.no_grad()
def _last_word_docs(model, rng: random.Random, count: int) -> list[dict]:
    """Contexts whose continuation is the model's greedy next byte when printable, else a word."""
    tok = byte_tokenizer()
    docs = []
    for _ in range(count):
        context = _sentence(rng, 3, 14)
        best = int(model(torch.tensor([tok(context)["input_ids"]])).logits[0, -1].argmax())
        cont = chr(best) if 33 <= best < 127 else " " + rng.choice(WORDS)
        docs.append({"context": context, "continuation": cont})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_tasks")
    rng = random.Random(0)
    mc = [
        {
            "query": "Question: " + _sentence(rng, 3, 12) + "?",
            "choices": [_sentence(rng, 1, 4) for _ in range(rng.choice((2, 4)))],
            "gold": 0,
        }
        for _ in range(14)
    ]
    for doc in mc:
        doc["gold"] = rng.randrange(len(doc["choices"]))
    mc.append(
        {"query": "Question: same prefix?", "choices": ["red", "red bird", "blue"], "gold": 1}
    )
    _write_jsonl(root / "mc.jsonl", mc)
    partial = []
    for _ in range(12):
        start = _sentence(rng, 2, 8)
        partial.append(
            {
                "context_options": [
                    f"{start} {rng.choice(WORDS)}",
                    f"{start} {rng.choice(WORDS)} {rng.choice(WORDS)}",
                ],
                "continuation": _sentence(rng, 2, 6) + ".",
                "gold": rng.randrange(2),
            }
        )
    _write_jsonl(root / "partial.jsonl", partial)
    (root / "t_mc.yaml").write_text(MC_YAML.format(root=root))
    (root / "t_partial.yaml").write_text(PARTIAL_YAML.format(root=root))
    for model_type in MODEL_TYPES:
        docs = _last_word_docs(tiny_model(model_type, 4, seed=0), random.Random(1), 12)
        assert any(len(d["continuation"]) == 1 for d in docs), (
            "no greedy document: the last-word test would be weak"
        )
        _write_jsonl(root / f"last_{model_type}.jsonl", docs)
        (root / f"t_last_{model_type}.yaml").write_text(
            LASTWORD_YAML.format(root=root, model_type=model_type)
        )
    return root


def _settings(task_dir, model_type: str, **kw) -> EvalSettings:
    return EvalSettings(
        tasks=("t_mc", "t_partial", f"t_last_{model_type}"), include_path=str(task_dir), **kw
    )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_candidate_matches_lm_eval(task_dir, model_type):
    model, tok = tiny_model(model_type, 4, seed=0), byte_tokenizer()
    settings = _settings(task_dir, model_type)
    fast = FastEvaluator(model, tok, settings)
    instances = fast.recorded
    candidates = [(), (0,), (1,), (2,), (3,), (1, 2), (0, 3)]
    answers = fast.answers(candidates)
    acc_ref = LmEvalRunner(model, tok, replace(settings, task_metric="acc"))
    norm_ref = LmEvalRunner(model, tok, replace(settings, tasks=("t_mc",), task_metric="acc_norm"))
    greedy_docs = 0
    for cand, got in zip(candidates, answers, strict=True):
        with layers_removed(model, cand), _without_env_info():  # env info: slow, changes no score
            reference = acc_ref.lm.loglikelihood(instances, disable_tqdm=True)
            want = acc_ref.run() | {f"{k}/norm": v for k, v in norm_ref.run().items()}
        for inst, (ll, greedy) in zip(instances, reference, strict=True):
            mine = got[tuple(inst.args)]
            assert mine[0] == pytest.approx(ll, rel=1e-5, abs=1e-4), (cand, inst.args)
            assert mine[1] == greedy, (cand, inst.args)
            greedy_docs += greedy
        have = fast.scores(got, "acc") | {
            f"{k}/norm": v for k, v in fast.scores(got, "acc_norm", tasks=("t_mc",)).items()
        }
        ties = close_calls(got, instances)
        assert set(have) == set(want)
        for name, score in want.items():
            print(
                f"{model_type} {cand} {name}: lm-eval {score.value:.4f} fast {have[name].value:.4f} ties {ties}"
            )
            assert abs(have[name].value - score.value) * score.n <= ties, (cand, name)
            assert have[name].n == score.n
            if not ties:
                assert have[name].stderr == pytest.approx(score.stderr, abs=1e-12)
    assert greedy_docs > 0  # the last-word task really exercised the greedy flag


def test_shared_removals_and_chunking_match(task_dir):
    """Greedy-step candidates (all removing block 1) and a tiny state budget (many chunks)."""
    model, tok = tiny_model("gemma3_text", 5, seed=3), byte_tokenizer()
    settings = _settings(task_dir, "gemma3_text")
    fast = FastEvaluator(
        model, tok, settings, state_budget=64 * 1024, row_tokens=64, batch_tokens=128
    )
    candidates = [(1,), (1, 0), (1, 2), (1, 4), (1, 2, 3)]
    answers = fast.answers(candidates)
    runner = LmEvalRunner(model, tok, settings)
    for cand, got in zip(candidates, answers, strict=True):
        with layers_removed(model, cand):
            reference = runner.lm.loglikelihood(fast.recorded, disable_tqdm=True)
        for inst, (ll, greedy) in zip(fast.recorded, reference, strict=True):
            assert got[tuple(inst.args)][0] == pytest.approx(ll, rel=1e-5, abs=1e-4)
            assert got[tuple(inst.args)][1] == greedy


def test_ablations_give_the_same_answers(task_dir):
    """Each speed idea switched off on its own changes time, not results."""
    model, tok = tiny_model("llama", 4, seed=1), byte_tokenizer()
    fast = FastEvaluator(model, tok, _settings(task_dir, "llama"))
    candidates = [(), (0,), (2,)]
    base = fast.answers(candidates)
    for switch in (
        "share_prefixes",
        "share_across_documents",
        "reuse_states",
        "scored_logits_only",
        "scored_last_feed_forward",
    ):
        fast.engine = FastEngine(model, **{switch: False})
        other = fast.answers(candidates)
        for a, b in zip(base, other, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key][0] == pytest.approx(b[key][0], rel=1e-5, abs=1e-4), (switch, key)
                assert a[key][1] == b[key][1]


def test_evaluate_removals_fast_engine_matches_lm_eval(task_dir):
    model, tok = tiny_model("llama", 3, seed=2), byte_tokenizer()
    loaded = SimpleNamespace(model=model, tokenizer=tok, source=None)
    settings = _settings(task_dir, "llama")
    candidates = [(), (0,), (1,), (2,)]
    fast = evaluate_removals(loaded, settings, candidates, engine="fast", progress=False)
    slow = evaluate_removals(loaded, settings, candidates, engine="lm-eval", progress=False)
    for f, s in zip(fast, slow, strict=True):
        assert f.keys() == s.keys()
        for name in f:
            assert (f[name].metric, f[name].value, f[name].n) == (
                s[name].metric,
                s[name].value,
                s[name].n,
            )


def test_interrupted_ranking_resumes_with_the_unfinished_candidates(
    task_dir, tmp_path, monkeypatch
):
    """Each candidate is cached the moment the fast engine finishes it: a Ctrl-C after the
    second candidate keeps those two, and the next run evaluates only the other three."""
    model, tok = tiny_model("llama", 4, seed=2), byte_tokenizer()
    loaded = SimpleNamespace(model=model, tokenizer=tok, source=None)
    settings = EvalSettings(tasks=("t_mc", "t_partial"), include_path=str(task_dir))
    candidates = [(), (0,), (1,), (2,), (3,)]
    reference = evaluate_removals(loaded, settings, candidates, engine="fast", progress=False)
    cache = ResultCache(tmp_path / "results")
    real_run = FastEngine.run
    asked: list[list[tuple[int, ...]]] = []  # the candidates of every engine run
    finished: list[tuple[int, ...]] = []
    interrupt_after: list[int] = [2]

    def run(self, requests, cands, *, on_done=None):
        asked.append([tuple(c) for c in cands])

        def done(i, answers):
            on_done(i, answers)
            finished.append(tuple(cands[i]))
            if len(finished) == interrupt_after[0]:
                raise KeyboardInterrupt

        return real_run(self, requests, cands, on_done=done)

    monkeypatch.setattr(FastEngine, "run", run)
    with pytest.raises(KeyboardInterrupt):
        evaluate_removals(loaded, settings, candidates, engine="fast", cache=cache, progress=False)
    assert asked == [candidates] and finished == [(), (0,)]  # the trunk's candidate first
    # Both tasks of the two finished candidates are on disk, nothing else.
    assert len(list((tmp_path / "results").rglob("*.json"))) == 2 * 2
    interrupt_after[0] = 0  # no more interruptions
    asked.clear()
    resumed = evaluate_removals(
        loaded, settings, candidates, engine="fast", cache=cache, progress=False
    )
    assert asked == [[(1,), (2,), (3,)]]  # only the unfinished three
    assert resumed == reference  # cached and fresh results are the uninterrupted numbers
    asked.clear()
    assert (
        evaluate_removals(loaded, settings, candidates, engine="fast", cache=cache, progress=False)
        == reference
    )
    assert asked == []  # everything cached now


def test_engine_reports_each_candidate_once_with_its_final_answers():
    """`on_done` fires once per listed candidate with the answers `run` returns, also when
    documents are split into several chunks (a candidate is complete in the last one)."""
    model = tiny_model("llama", 4, seed=0)
    requests = _random_requests(random.Random(3), docs=6)
    candidates = [(1,), (), (1, 2), (1,), (3,)]
    for budget in (None, 2048):  # one chunk; many chunks
        engine = FastEngine(model, state_budget=budget, row_tokens=32, batch_tokens=64)
        reported: dict[int, list] = {}
        got = engine.run(
            requests, candidates, on_done=lambda i, a, seen=reported: seen.setdefault(i, list(a))
        )
        assert sorted(reported) == list(range(len(candidates)))
        assert [reported[i] for i in range(len(candidates))] == got


def _random_requests(rng: random.Random, docs: int = 5) -> list[Request]:
    """Multiple-choice-like token requests: per document one context and three continuations."""
    requests = []
    for doc in range(docs):
        context = [rng.randrange(1, 256) for _ in range(rng.randrange(3, 12))]
        for choice in range(3):
            cont = [rng.randrange(1, 256) for _ in range(rng.randrange(1, 5))]
            requests.append(
                Request((str(doc), str(choice)), ("t", doc), (context + cont)[:-1], cont)
            )
    return requests


def _plain_answers(model, requests: list[Request]) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) per request from one unpacked forward each, as HFLM computes them."""
    out = []
    with torch.inference_mode():
        for req in requests:
            logits = model(torch.tensor([req.inputs])).logits[0, -len(req.targets) :]
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(req.targets)
            ll = float(logprobs.gather(-1, targets[:, None]).sum())
            out.append((ll, bool((logprobs.argmax(-1) == targets).all())))
    return out


def _assert_matches_plain_forward(model, requests, candidates, engine: FastEngine) -> None:
    """The engine's answers under each candidate equal one unpacked forward per request."""
    got = engine.run(requests, candidates)
    for cand, answers in zip(candidates, got, strict=True):
        with layers_removed(model, cand):
            want = _plain_answers(model, requests)
        for req, mine, ref in zip(requests, answers, want, strict=True):
            assert mine[0] == pytest.approx(ref[0], rel=1e-5, abs=1e-4), (cand, req.key)
            assert mine[1] == ref[1], (cand, req.key)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_architecture_matches_a_plain_forward(model_type):
    """Token trees, state reuse, scored-only logits and last feed-forward on each tiny
    architecture (GPT-2 passes the mask positionally, OPT has no `mlp` module)."""
    model = tiny_model(model_type, 4, seed=0)
    requests = _random_requests(random.Random(0))
    candidates = [(), (0,), (2,), (3,), (1, 2)]
    _assert_matches_plain_forward(model, requests, candidates, FastEngine(model))


def test_documents_sharing_a_prefix_share_a_tree():
    """Twin documents (WinoGrande style: same opening, different ending) merge into one tree
    when they fit in a row, and still get exactly their own answers."""
    model = tiny_model("gemma3_text", 4, seed=2)  # sliding windows count depth, not row position
    rng = random.Random(5)
    requests, opening = [], []
    for doc in range(6):
        if doc % 2 == 0:  # a new pair of twins
            opening = [rng.randrange(1, 256) for _ in range(10)]
        ending = [rng.randrange(1, 256) for _ in range(3)]
        for choice in range(2):
            cont = [rng.randrange(1, 256) for _ in range(2)]
            requests.append(
                Request((str(doc), str(choice)), ("t", doc), opening + ending + cont[:-1], cont)
            )
    merged = plan_batches(requests, row_tokens=64)
    separate = plan_batches(requests, row_tokens=64, across_documents=False)
    tokens = lambda plans: sum(len(t.tokens) for p in plans for row in p for t in row)  # noqa: E731
    assert tokens(merged) == tokens(separate) - 3 * 10  # each twin pair shares its opening once
    _assert_matches_plain_forward(
        model, requests, [(), (1,), (3,)], FastEngine(model, row_tokens=64)
    )


def test_last_feed_forward_runs_at_scored_positions_only():
    model = tiny_model("llama", 3, seed=0)
    requests = _random_requests(random.Random(1), docs=3)
    shapes: dict[int, list[tuple[int, ...]]] = {0: [], 2: []}
    blocks = model.model.layers
    hooks = [
        blocks[i].mlp.register_forward_hook(
            lambda mod, args, out, i=i: shapes[i].append(tuple(args[0].shape[:-1]))
        )
        for i in shapes
    ]
    engine = FastEngine(model)
    engine.checked = True  # no self-check: its plain forwards would show up too
    try:
        engine.run(requests, [()])
    finally:
        for hook in hooks:
            hook.remove()
    scored = len(
        {
            (r.group, tuple(r.inputs[: len(r.inputs) - len(r.targets) + k]))
            for r in requests
            for k in range(1, len(r.targets) + 1)
        }
    )
    assert shapes[0] and all(len(s) == 2 for s in shapes[0])  # (rows, width): every position
    assert sum(rows * width for rows, width in shapes[0]) > scored
    assert shapes[2] and all(len(s) == 1 for s in shapes[2])  # kept positions, flattened
    assert sum(n for (n,) in shapes[2]) == scored


def test_attention_windows_follow_the_config():
    gemma = tiny_model("gemma3_text", 4).config
    assert attention_windows(gemma, 4) == [4, 4, None, 4]
    assert attention_windows(tiny_model("llama", 2).config, 2) == [None, None]
    assert attention_windows(SimpleNamespace(sliding_window=16), 3) == [16, 16, 16]
    assert attention_windows(SimpleNamespace(sliding_window=16, use_sliding_window=False), 2) == [
        None,
        None,
    ]


def test_bad_candidate_is_a_prune_error(task_dir):
    model, tok = tiny_model("llama", 2, seed=0), byte_tokenizer()
    fast = FastEvaluator(model, tok, _settings(task_dir, "llama"))
    with pytest.raises(PruneError, match="out of range"):
        fast.answers([(5,)])
    with pytest.raises(PruneError, match="cannot remove all"):
        fast.answers([(0, 1)])


ROLLING_YAML = """task: t_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{root}/rolling.jsonl"
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def test_auto_falls_back_to_lm_eval_where_fast_cannot(tmp_path):
    """A rolling-perplexity task: 'fast' refuses with a clear message, 'auto' gives lm-eval's numbers."""
    rng = random.Random(3)
    _write_jsonl(tmp_path / "rolling.jsonl", [{"text": _sentence(rng, 5, 12)} for _ in range(3)])
    (tmp_path / "t_rolling.yaml").write_text(ROLLING_YAML.format(root=tmp_path))
    loaded = SimpleNamespace(
        model=tiny_model("llama", 4, seed=0), tokenizer=byte_tokenizer(), source=None
    )
    settings = EvalSettings(tasks=("t_rolling",), include_path=str(tmp_path))
    with pytest.raises(FastEngineUnsupported, match="rolling perplexity") as refused:
        evaluate_removals(loaded, settings, [(1,)], engine="fast", progress=False)
    assert refused.value.reason == str(refused.value)
    # The library names no CLI flag; the CLI adds the hint.
    assert "--engine" not in refused.value.reason
    auto = evaluate_removals(loaded, settings, [(), (1,)], engine="auto", progress=False)
    reference = evaluate_removals(loaded, settings, [(), (1,)], engine="lm-eval", progress=False)
    assert [s["t_rolling"].value for s in auto] == [s["t_rolling"].value for s in reference]
    assert auto[0]["t_rolling"].value != auto[1]["t_rolling"].value
