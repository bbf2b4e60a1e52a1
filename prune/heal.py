"""`prune heal`: recover what pruning cost by distilling the base model into the pruned one.

The student (a folder `prune` exported) learns to match the next-token distributions of a
teacher (by default the model its prune.json says the cut started from) on calibration
text: the loss is KL(teacher || student) per token, averaged over tokens, plus `lm_weight`
times the language-modelling cross-entropy. What trains is the method's choice:

- lora: low-rank adapters (peft) on every linear layer of every block, merged into plain
  weights before export, so the healed folder loads with plain transformers;
- full: every parameter of every block (embeddings, final norm and head stay frozen);
- adjacent: only the blocks beside each cut (just before and just after each run of
  removed blocks), numbered as in the student.

Calibration texts are split once (seeded) into training and held-out texts, so the
held-out KL to the teacher and the student's perplexity, measured before and after with
paired intervals over held-out chunks, are on text the student never trained on; with
report tasks, their scores before and after are compared with paired intervals over
documents (`prune.heal_measure`).

Long runs: a tqdm bar shows the loss; the trainable weights, the optimizer and the RNG
states are saved every `checkpoint_every` steps and on Ctrl-C into a work folder beside
the output (`prune.heal_state`), and `resume=True` continues from there. The data order is
a pure function of the seed and the step (`prune.heal_data`), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prune.defaults import (
    CALIBRATION_SEQ_LEN,
    EXPORT_DTYPES,
    HEAL_BATCH_SIZE,
    HEAL_CHECKPOINT_EVERY,
    HEAL_LEARNING_RATES,
    HEAL_LORA_RANK,
    HEAL_METHODS,
    HEAL_SAMPLES,
    HEAL_STEPS,
    SEED,
)
from prune.errors import PruneError
from prune.export import PRUNE_JSON, check_output_dir, dtype_name
from prune.heal_data import batch_rows, chunk_tokens, learning_rate, split_texts
from prune.heal_measure import (
    compare_heldout,
    compare_tasks,
    distillation_loss,
    heldout_scores,
    loss_summary,
    outcome_values,
    task_outcomes,
)
from prune.heal_state import (
    STATE_FILE,
    HealStateMismatch,
    Progress,
    load_state,
    prepare_state_dir,
    rng_state,
    save_state,
    set_rng_state,
    state_dir_for,
    trainable_state,
)
from prune.models import pruned_record
from prune.streaming import source_dtype

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class HealSettings:
    """Everything that decides the healed weights (a resumed run must use the same)."""

    method: str = "lora"
    steps: int = HEAL_STEPS
    lr: float | None = None  # None: the method's default (HEAL_LEARNING_RATES)
    batch_size: int = HEAL_BATCH_SIZE
    seq_len: int = CALIBRATION_SEQ_LEN
    grad_accum: int = 1
    lm_weight: float = 0.0
    lora_rank: int = HEAL_LORA_RANK
    calibration: str | None = None
    samples: int = HEAL_SAMPLES
    seed: int = SEED
    dtype: str = "auto"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else HEAL_LEARNING_RATES[self.method]

    def check(self) -> None:
        """PruneError naming every bad value at once."""
        problems = []
        if self.method not in HEAL_METHODS:
            problems.append(f"method '{self.method}' (accepted: {', '.join(HEAL_METHODS)})")
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} (accepted: an integer >= 1)")
        if self.seq_len < 2:
            problems.append(f"seq_len {self.seq_len} (accepted: an integer >= 2)")
        if self.lr is not None and not 0 < self.lr < math.inf:
            problems.append(f"lr {self.lr} (accepted: a finite number > 0)")
        if not 0 <= self.lm_weight < math.inf:
            problems.append(f"lm_weight {self.lm_weight} (accepted: a finite number >= 0)")
        if problems:
            raise PruneError("bad healing settings: " + "; ".join(problems))


@dataclass
class HealResult:
    """What `heal_variant` wrote: the folder and its prune.json `healing` section."""

    out: Path
    healing: dict[str, Any]


# --- teacher and blocks ------------------------------------------------------------


def recorded_teacher(record: Mapping[str, Any]) -> str | None:
    """The model a prune.json record's cut started from, as `load_model` reads it: the path
    for local folders and GGUF files, else the spec (embedded names, Hub ids)."""
    source = record.get("original_source") or record.get("source")
    if not isinstance(source, Mapping):
        return None
    if source.get("kind") in ("local", "gguf") and source.get("path"):
        return str(source["path"])
    return source.get("spec") or source.get("hub_id")


def removed_runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive removed blocks as inclusive (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(removed)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def adjacent_blocks(removed: Sequence[int], depth: int, num_blocks: int) -> list[int]:
    """Student indices of the blocks just before and just after each run of `removed`
    blocks (numbered in the original `depth`-block model)."""
    gone = set(removed)
    kept = [i for i in range(depth) if i not in gone]
    if len(kept) != num_blocks:
        raise PruneError(
            f"prune.json says {len(kept)} of {depth} blocks were kept but the student has "
            f"{num_blocks}: cannot tell which blocks are beside the cut (use --method lora or full)"
        )
    position = {original: j for j, original in enumerate(kept)}
    chosen = set()
    for first, last in removed_runs(removed):
        chosen.update(position[i] for i in (first - 1, last + 1) if i in position)
    return sorted(chosen)


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0])


def check_vocabularies(teacher: Any, student: Any, teacher_spec: str) -> None:
    """PruneError unless teacher and student predict over the same tokens."""
    t_size, s_size = _vocab_size(teacher.model), _vocab_size(student.model)
    if t_size != s_size:
        raise PruneError(
            f"teacher '{teacher_spec}' predicts {t_size} tokens and the student {s_size}: "
            "healing matches next-token distributions, so both need the same vocabulary "
            "(pass --teacher with the model the variant was pruned from)"
        )
    if teacher.tokenizer is not None and student.tokenizer is not None:
        if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            raise PruneError(
                f"teacher '{teacher_spec}' has another tokenizer vocabulary than the student: "
                "healing matches next-token distributions, so both need the same tokenizer "
                "(pass --teacher with the model the variant was pruned from)"
            )


# --- trainable parameters ----------------------------------------------------------


def block_linear_names(model: Any) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (nn.Linear, and GPT-2's
    Conv1D): the LoRA targets, found without knowing the architecture's module names."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from prune.surgery import locate_layers

    stack = locate_layers(model)
    return [
        f"{stack.path}.{i}.{name}"
        for i, block in enumerate(stack.layers)
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    ]


def make_trainable(model: Any, method: str, blocks: Sequence[int] | None, lora_rank: int) -> Any:
    """The model to train: peft-wrapped for lora, else with only the chosen blocks'
    parameters requiring grad (`blocks` None: every block)."""
    from prune.surgery import locate_layers

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=0.0,
            target_modules=block_linear_names(model),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.filterwarnings("ignore", category=FutureWarning)
            return get_peft_model(model, config)
    model.requires_grad_(False)
    layers = locate_layers(model).layers
    for i in range(len(layers)) if blocks is None else blocks:
        layers[i].requires_grad_(True)
    return model


# --- the run ------------------------------------------------------------------------


def heal_variant(
    variant: str | Path,
    out: str | Path,
    *,
    teacher: str | None = None,
    settings: HealSettings = HealSettings(),
    report: Any | None = None,
    report_before: Mapping[str, Any] | None = None,
    engine: str = "auto",
    export_dtype: str = "auto",
    device: str = "auto",
    data_dir: str | None = None,
    checkpoint_every: int = HEAL_CHECKPOINT_EVERY,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    extra: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> HealResult:
    """`prune heal`: distil `teacher` into the pruned `variant` folder and export to `out`.

    Args:
        variant: a checkpoint folder; its prune.json names the default teacher and, for
            the adjacent method, the removed blocks.
        out: the healed checkpoint folder (same block count, prune.json with `healing`).
        teacher: any `load_model` spec; default the model the variant was pruned from.
        settings: what decides the healed weights (see `HealSettings`).
        report: `EvalSettings` of report tasks scored before and after healing (paired
            over documents); None scores none.
        report_before: the variant's `report` scores (task -> TaskScore with per-document
            outcomes) when the caller has them (`prune run`); None: measured here.
        engine: the evaluation engine for `report` ("auto", "fast", "lm-eval").
        export_dtype: the dtype written; "auto": the variant's checkpoint dtype (training
            in float32 does not double the size of a bfloat16 variant).
        device: where both models run.
        data_dir: benchmark data folder, for the default calibration text.
        checkpoint_every: save a resumable state every N steps (0: only on Ctrl-C).
        resume: continue from the state an interrupted run saved.
        overwrite: replace `out`, and discard an unfinished run's state.
        progress: show the tqdm bar.
        on_step: called with (step, loss) after each optimizer step.
        extra: more top-level prune.json fields (e.g. `prune run`'s run fingerprint).
        repo_id: the Hub repo the card's Use section loads (default: a folder path).

    Raises:
        PruneError: bad settings or folders, no teacher known, vocabularies that differ.
        KeyboardInterrupt: Ctrl-C, after saving a resumable state; its message says so.
    """
    import torch

    from prune.calibration import load_calibration
    from prune.models import load_model, require_tokenizer
    from prune.surgery import count_layers

    settings.check()
    if checkpoint_every < 0:
        raise PruneError(f"checkpoint_every {checkpoint_every} (accepted: an integer >= 0)")
    if export_dtype != "auto" and export_dtype not in EXPORT_DTYPES:
        raise PruneError(
            f"unknown export dtype '{export_dtype}' (accepted: auto, {', '.join(EXPORT_DTYPES)})"
        )
    variant, out = Path(variant), Path(out)
    record = pruned_record(variant)
    teacher = teacher or _default_teacher(variant, record)
    if settings.method == "adjacent" and record is None:
        raise PruneError(
            f"--method adjacent needs the removed blocks from {variant / PRUNE_JSON}, "
            "which is missing (use --method lora or full)"
        )
    check_output_dir(out, overwrite)
    state_dir = state_dir_for(out)
    prepare_state_dir(state_dir, resume, overwrite)
    texts = load_calibration(settings.calibration, samples=settings.samples, data_dir=data_dir)
    train_texts, heldout_texts = split_texts(texts, settings.seed)

    student = load_model(str(variant), dtype=settings.dtype, device=device)
    mentor = load_model(teacher, dtype=settings.dtype, device=device, tokenizer_for="healing")
    check_vocabularies(mentor, student, teacher)
    tokenizer = student.tokenizer or require_tokenizer(mentor, "healing")
    num_blocks = count_layers(student.model)
    blocks = _trained_blocks(variant, record, num_blocks) if settings.method == "adjacent" else None
    train = chunk_tokens(tokenizer, train_texts, settings.seq_len)  # (N, T)
    heldout = chunk_tokens(tokenizer, heldout_texts, settings.seq_len)  # (M, T)
    teacher_model = mentor.model.requires_grad_(False).eval()
    dev = next(student.model.parameters()).device
    fingerprint = {
        **asdict(settings),
        "teacher": teacher,
        "variant": str(variant.resolve()),
        "report": None if report is None else _report_key(report, engine),
    }
    saved = load_state(state_dir, fingerprint) if resume else None
    if saved is not None:
        before, tasks_before = saved["before"], saved["tasks_before"]
    else:
        started = time.perf_counter()
        before = heldout_scores(student.model, teacher_model, heldout, settings.batch_size, dev)
        tasks_before = None
        if report is not None and report_before is not None:
            tasks_before = outcome_values(report_before)
        elif report is not None:
            tasks_before = task_outcomes(student.model.eval(), tokenizer, report, engine)
        if report is not None and not tasks_before:
            raise PruneError(
                f"the report tasks {', '.join(report.tasks)} give no per-document outcomes "
                "to compare before and after healing (use multiple-choice or loglikelihood "
                "tasks, or --tasks none)"
            )
        seconds = time.perf_counter() - started

    torch.manual_seed(settings.seed)  # LoRA's initial A matrices, dropout
    model = make_trainable(student.model, settings.method, blocks, settings.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    if saved is not None:
        unexpected = model.load_state_dict(saved["trainable"], strict=False).unexpected_keys
        if unexpected or set(saved["trainable"]) != set(trainable_state(model)):
            raise HealStateMismatch(
                f"the saved healing state in '{state_dir}' does not fit this model "
                "(pass --overwrite instead of --resume to start again)"
            )
        optimizer.load_state_dict(saved["optimizer"])
        state = Progress(saved["step"], list(saved["losses"]), saved["seconds"], saved["rng"])
        set_rng_state(state.rng)
        log.info("resuming at step %d of %d from %s", state.step, settings.steps, state_dir)
    else:
        state = Progress(seconds=seconds, rng=rng_state())

    def save() -> None:
        save_state(
            state_dir,
            {
                "settings": fingerprint,
                "step": state.step,
                "losses": state.losses,
                "seconds": state.seconds,
                "rng": state.rng,
                "trainable": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "before": before,
                "tasks_before": tasks_before,
            },
        )

    _train(
        model, teacher_model, optimizer, params, train, settings, state, dev,
        save=save, state_dir=state_dir, checkpoint_every=checkpoint_every,
        progress=progress, on_step=on_step,
    )  # fmt: skip

    started = time.perf_counter()
    if settings.method == "lora":
        model = model.merge_and_unload()  # plain transformers modules with merged weights
    model.eval()
    model.requires_grad_(False)
    compute = next(model.parameters()).dtype
    target = export_dtype if export_dtype != "auto" else source_dtype(student)
    if target is not None and getattr(torch, target) != compute:
        # Measure the weights that will be written (rounded to the export dtype), in the
        # compute dtype, as loading the healed folder to evaluate it would.
        model.to(getattr(torch, target)).to(compute)
    after = heldout_scores(model, teacher_model, heldout, settings.batch_size, dev)
    tasks = None
    if report is not None:
        tasks_after = task_outcomes(model, tokenizer, report, engine)
        tasks = compare_tasks(tasks_before, tasks_after, report, settings.seed)
    healing = {
        "method": settings.method,
        "teacher": teacher,
        "steps": settings.steps,
        "lr": settings.learning_rate,
        "batch_size": settings.batch_size,
        "grad_accum": settings.grad_accum,
        "seq_len": settings.seq_len,
        "lm_weight": settings.lm_weight,
        **({"lora_rank": settings.lora_rank} if settings.method == "lora" else {}),
        **({"blocks": blocks} if blocks is not None else {}),
        "calibration": settings.calibration or "lambada_openai (local)",
        "samples": len(texts),
        "train_texts": len(train_texts),
        "train_chunks": len(train),
        "heldout_texts": len(heldout_texts),
        "seed": settings.seed,
        "compute_dtype": dtype_name(compute),
        "loss": loss_summary(state.losses),
        "heldout": compare_heldout(before, after, settings.seed),
        **({"tasks": tasks} if tasks is not None else {}),
        "seconds": round(state.seconds + time.perf_counter() - started, 1),
    }
    if target is not None:
        model.to(getattr(torch, target))  # floating tensors only
    _export(
        student,
        model,
        variant,
        out,
        record,
        {**(extra or {}), "healing": healing},
        num_blocks,
        overwrite,
        repo_id,
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    return HealResult(out, healing)


def _default_teacher(variant: Path, record: Mapping[str, Any] | None) -> str:
    """The model the variant's prune.json says its cut started from; PruneError if none."""
    if record is None:
        raise PruneError(
            f"'{variant}' has no {PRUNE_JSON}, so the model it was pruned from is unknown "
            "(pass --teacher MODEL)"
        )
    teacher = recorded_teacher(record)
    if teacher is None:
        raise PruneError(f"{variant / PRUNE_JSON} names no source model (pass --teacher MODEL)")
    return teacher


def _trained_blocks(variant: Path, record: Mapping[str, Any], num_blocks: int) -> list[int]:
    """The adjacent method's blocks, from the removed blocks prune.json records."""
    removed = record.get("removed_layers_original", record.get("removed_layers")) or []
    depth = record.get("num_layers_original", record.get("num_layers_before"))
    blocks = adjacent_blocks(removed, depth, num_blocks)
    if not blocks:
        raise PruneError(f"{variant / PRUNE_JSON} records no removed blocks to heal beside")
    return blocks


def _report_key(report: Any, engine: str) -> dict[str, Any]:
    """What decides the report scores (part of a resumable state's fingerprint): the scores
    saved before healing are paired with those after, document by document."""
    return {
        "tasks": list(report.tasks),
        "limit": report.limit,
        "num_fewshot": report.num_fewshot,
        "metric": report.task_metric,
        "data_dir": report.data_dir,
        "include_path": report.include_path,
        "seed": report.seed,
        "engine": engine,
    }


def _train(
    model: Any,
    teacher: Any,
    optimizer: Any,
    params: list[Any],
    train: Any,
    settings: HealSettings,
    state: Progress,
    device: Any,
    *,
    save: Callable[[], None],
    state_dir: Path,
    checkpoint_every: int,
    progress: bool,
    on_step: Callable[[int, float], None] | None,
) -> None:
    """Optimizer steps from `state.step` to `settings.steps`, updating `state`; a checkpoint
    every `checkpoint_every` steps and at the end (when checkpointing at all), and on Ctrl-C
    unless the weights are half updated (then the last checkpoint stands)."""
    import torch
    from tqdm.auto import tqdm

    model.train()
    updating = False
    started = time.perf_counter()
    bar = tqdm(
        total=settings.steps, initial=state.step, desc="healing", disable=not progress, leave=False
    )
    try:
        while state.step < settings.steps:
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                index = state.step * settings.grad_accum + micro
                rows = batch_rows(len(train), settings.batch_size, settings.seed, index)
                ids = train[rows].to(device)  # (B, T)
                with torch.no_grad():
                    target = teacher(input_ids=ids).logits  # (B, T, V)
                loss = distillation_loss(
                    model(input_ids=ids).logits, target, ids, settings.lm_weight
                )
                (loss / settings.grad_accum).backward()
                step_loss += loss.item() / settings.grad_accum
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, settings.steps, settings.learning_rate)
            updating = True  # a Ctrl-C from here on leaves the weights half updated
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updating = False
            state.step += 1
            state.losses.append(step_loss)
            state.rng = rng_state()
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if on_step is not None:
                on_step(state.step, step_loss)
            if checkpoint_every and state.step % checkpoint_every == 0:
                if state.step < settings.steps:
                    state.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    save()
    except KeyboardInterrupt as exc:
        bar.close()
        state.seconds += time.perf_counter() - started
        if updating:  # keep the last checkpoint, if any: these weights are half updated
            where = (
                f"the last checkpoint is in {state_dir}"
                if (state_dir / STATE_FILE).is_file()
                else "nothing was saved"
            )
        else:
            save()
            where = f"the state after step {state.step} is saved in {state_dir}"
        raise type(exc)(
            f"healing interrupted at step {state.step} of {settings.steps}; {where} "
            "(run the same command with --resume to continue)"
        ) from exc
    bar.close()
    state.seconds += time.perf_counter() - started
    if checkpoint_every:  # a Ctrl-C during evaluation or export then resumes right here
        save()


def _export(
    student: Any,
    model: Any,
    variant: Path,
    out: Path,
    record: Mapping[str, Any] | None,
    fields: dict[str, Any],
    num_blocks: int,
    overwrite: bool,
    repo_id: str | None = None,
) -> None:
    """Write the healed model with `fields` (`healing` and any extra) in its prune.json: no
    block removed in this step, so the chain (see `prune.export`) keeps the variant's cut;
    the card is the variant's plus Healing."""
    from prune.export import export_checkpoint
    from prune.heal_card import healed_card
    from prune.models import LoadedModel

    try:
        card = (variant / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        card = None
    healed = LoadedModel(model, student.tokenizer, student.source, student.checkpoint_dir)

    def files(new_record: Mapping[str, Any]) -> dict[str, str]:
        return {"README.md": healed_card(card, record, new_record, str(variant), repo_id)}

    export_checkpoint(
        healed,
        out,
        [],
        num_blocks,
        overwrite=overwrite,
        extra=fields,
        files=files,
        compute_dtype=fields["healing"]["compute_dtype"],
    )
