"""Evaluating models and pruned candidates on lm-eval tasks, and caching the results.

One job per submodule; import from the one you need (this package imports none of them):

- `settings`: `EvalSettings` (what to evaluate and how), `TaskScore` (one task's
  score) and `DocOutcomes` (the per-document results behind a score: each document's
  metric values, log-likelihoods, gold choice and acc_norm divisors). Torch-free.
- `cache`: `ResultCache`, the on-disk store of scores (with their outcomes) keyed by
  model fingerprint, removed blocks, task, settings and engine; `model_fingerprint`;
  `CACHE_VERSION`.
- `engine`: the fast engine, which scores tokenized requests under many
  block-removal candidates in one shared computation (token trees, prefix reuse,
  scored logits only); `perplexities` for the perplexity measure. Torch only: it
  never imports lm-eval.
- `harness`: the lm-evaluation-harness glue and the only module that touches its
  private API: `LmEvalRunner`, `lm_eval_runner`, `scores_from_results`,
  `outcomes_from_samples`, and
  `FastEvaluator` / `evaluate_candidates`, the fast engine behind lm-eval's tasks.
- `removals`: `evaluate` and `evaluate_removals`, which pick an engine by name
  ("auto", "fast", "lm-eval"), fall back from fast to lm-eval (`with_fallback`) and
  use the cache; `check_engine`.
- `perplexity`: `perplexity`, the plain token-level perplexity of one model on texts.

Dependencies point one way, imports inside functions included: removals -> harness
-> engine; removals -> cache; harness and cache -> settings. Nothing here imports
prune's higher modules (measures, compare, pipeline, cli).
"""
