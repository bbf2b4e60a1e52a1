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
paired intervals over held-out chunks, are on text the student never trained on.

Long runs: a tqdm bar shows the loss; the trainable weights, the optimizer and the RNG
states are saved every `checkpoint_every` steps and on Ctrl-C into a work folder beside
the output (`.OUT.heal-state/`), and `resume=True` continues from there. The data order is
a pure function of the seed and the step, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prune.atomic import atomic_path
from prune.defaults import (
    CALIBRATION_SEQ_LEN,
    HEAL_BATCH_SIZE,
    HEAL_CHECKPOINT_EVERY,
    HEAL_HELDOUT_SHARE,
    HEAL_LEARNING_RATES,
    HEAL_LORA_RANK,
    HEAL_METHODS,
    HEAL_SAMPLES,
    HEAL_STEPS,
    SEED,
)
from prune.errors import PruneError
from prune.export import PRUNE_JSON, check_output_dir
from prune.models import pruned_record

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
WARMUP_SHARE = 0.05  # of the steps, linear warm-up before a cosine decay to MIN_LR_SHARE
MIN_LR_SHARE = 0.1
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
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr {self.lr} (accepted: a number > 0)")
        if not self.lm_weight >= 0:
            problems.append(f"lm_weight {self.lm_weight} (accepted: a number >= 0)")
        if problems:
            raise PruneError("bad healing settings: " + "; ".join(problems))


@dataclass
class HealResult:
    """What `heal_variant` wrote: the folder and its prune.json `healing` section."""

    out: Path
    healing: dict[str, Any]


@dataclass
class _Progress:
    """The training state saved in checkpoints (besides weights and optimizer)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rng: dict[str, Any] = field(default_factory=dict)


def state_dir_for(out: Path) -> Path:
    """The work folder beside `out` where checkpoints of an unfinished heal live."""
    out = Path(out)
    return out.absolute().parent / f".{out.name}.heal-state"


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


# --- data --------------------------------------------------------------------------


def split_texts(
    texts: Sequence[str], seed: int, share: float = HEAL_HELDOUT_SHARE
) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: a seeded `share` of the texts (at least one) is held out."""
    if len(texts) < 2:
        raise PruneError(
            f"healing needs at least 2 calibration texts (one to train on, one held out); "
            f"got {len(texts)} (raise --samples or use a longer --calibration source)"
        )
    order = random.Random(seed).sample(range(len(texts)), len(texts))
    held = max(1, round(len(texts) * share))
    return [texts[i] for i in sorted(order[:-held])], [texts[i] for i in sorted(order[-held:])]


def chunk_tokens(tokenizer: Any, texts: Sequence[str], seq_len: int) -> Any:
    """The texts' tokens (each followed by EOS) cut into (N, seq_len) chunks; a stream
    shorter than one chunk is one shorter chunk, the tail of a longer one is dropped."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise PruneError("calibration texts produced fewer than 2 tokens")
    if len(ids) < seq_len:
        return torch.tensor([ids])
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


@functools.lru_cache(maxsize=8)
def _permutation(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(size, generator=generator).tolist())


def batch_rows(size: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Chunk indices of micro-batch `index`: the chunks in seeded per-epoch orders, read in
    turn (a pure function, so a resumed run reads what an uninterrupted one would)."""
    rows = []
    for position in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(position, size)
        rows.append(_permutation(size, seed, epoch)[offset])
    return rows


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over WARMUP_SHARE of the steps, then cosine decay to MIN_LR_SHARE."""
    warmup = max(1, round(steps * WARMUP_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- loss and evaluation -----------------------------------------------------------


def distillation_loss(student_logits: Any, teacher_logits: Any, input_ids: Any, lm_weight: float):
    """KL(teacher || student) of the next-token distributions, mean over tokens (temperature
    1), plus `lm_weight` x the next-token cross-entropy. Logits are (B, T, V), ids (B, T)."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(
            log_s[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()
        )
    return loss


def heldout_scores(
    student: Any, teacher: Any, chunks: Any, batch_size: int, device: Any
) -> dict[str, list[float]]:
    """Per held-out chunk: the mean KL(teacher || student) per token, and the mean
    next-token negative log-likelihood of the student and of the teacher."""
    import torch
    import torch.nn.functional as F

    scores: dict[str, list[float]] = {"kl": [], "nll": [], "teacher_nll": []}
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start : start + batch_size].to(device)  # (B, T)
            log_s = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)  # (B, T, V)
            log_t = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
            kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T)
            target = ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
            nll = -log_s[:, :-1].gather(-1, target).squeeze(-1)  # (B, T-1)
            teacher_nll = -log_t[:, :-1].gather(-1, target).squeeze(-1)
            scores["kl"] += kl.mean(-1).tolist()
            scores["nll"] += nll.mean(-1).tolist()
            scores["teacher_nll"] += teacher_nll.mean(-1).tolist()
    student.train(was_training)
    return scores


def compare_heldout(before: Mapping[str, list], after: Mapping[str, list], seed: int) -> dict:
    """Before/after held-out figures with paired 95% intervals over held-out chunks: the
    KL change, and the perplexity ratio after/before (exp of the mean NLL change)."""
    from prune.stats import paired_difference

    def paired(name: str):
        def side(values):
            return {"heldout": dict(enumerate(values))}

        return paired_difference(side(after[name]), side(before[name]), seed=seed)

    def mean(values):
        return sum(values) / len(values)

    kl, nll = paired("kl"), paired("nll")
    return {
        "chunks": len(before["kl"]),
        "kl_before": mean(before["kl"]),
        "kl_after": mean(after["kl"]),
        "kl_change": kl.to_dict(),
        "perplexity_before": math.exp(mean(before["nll"])),
        "perplexity_after": math.exp(mean(after["nll"])),
        "perplexity_ratio": math.exp(nll.diff),
        "perplexity_ratio_ci95": [math.exp(nll.ci95[0]), math.exp(nll.ci95[1])],
        "teacher_perplexity": math.exp(mean(before["teacher_nll"])),
    }


def loss_summary(losses: Sequence[float], points: int = 10) -> dict[str, Any]:
    """The loss curve in `points` windows of steps (mean loss of each), first and last."""
    size = max(1, math.ceil(len(losses) / points))
    curve = [
        {"steps": [start + 1, min(start + size, len(losses))], "loss": sum(w) / len(w)}
        for start in range(0, len(losses), size)
        if (w := losses[start : start + size])
    ]
    return {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "curve": curve,
    }


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


def trainable_state(model: Any) -> dict[str, Any]:
    """Copies of the parameters that train, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if (
        "cuda" in state
        and torch.cuda.is_available()
        and len(state["cuda"]) == len(torch.cuda.get_rng_state_all())
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run ------------------------------------------------------------------------


def _prepare_state_dir(state_dir: Path, resume: bool, overwrite: bool) -> None:
    state = state_dir / STATE_FILE
    if resume and not state.is_file():
        raise PruneError(f"nothing to resume: no saved healing state in '{state_dir}'")
    if not resume and state_dir.exists():
        if not overwrite:
            raise PruneError(
                f"an unfinished heal left its state in '{state_dir}' (pass --resume to "
                "continue it, or --overwrite to start again)"
            )
        shutil.rmtree(state_dir)


def _load_state(state_dir: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    try:
        saved = torch.load(state_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise PruneError(
            f"cannot read the saved healing state '{state_dir / STATE_FILE}': {exc} "
            "(pass --overwrite instead of --resume to start again)"
        ) from exc
    differing = [
        f"{k} {saved['settings'].get(k)!r} -> {v!r}"
        for k, v in fingerprint.items()
        if saved["settings"].get(k) != v
    ]
    if differing:
        raise PruneError(
            "--resume needs the settings of the interrupted run; these differ: "
            + ", ".join(differing)
            + " (pass --overwrite instead of --resume to start again)"
        )
    return saved


def _save_state(state_dir: Path, payload: Mapping[str, Any]) -> None:
    import torch

    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_dir / STATE_FILE) as tmp:
        torch.save(dict(payload), tmp)


def heal_variant(
    variant: str | Path,
    out: str | Path,
    *,
    teacher: str | None = None,
    settings: HealSettings = HealSettings(),
    device: str = "auto",
    data_dir: str | None = None,
    checkpoint_every: int = HEAL_CHECKPOINT_EVERY,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> HealResult:
    """`prune heal`: distil `teacher` into the pruned `variant` folder and export to `out`.

    Args:
        variant: a checkpoint folder; its prune.json names the default teacher and, for
            the adjacent method, the removed blocks.
        out: the healed checkpoint folder (same block count, prune.json with `healing`).
        teacher: any `load_model` spec; default the model the variant was pruned from.
        settings: what decides the healed weights (see `HealSettings`).
        device: where both models run.
        data_dir: benchmark data folder, for the default calibration text.
        checkpoint_every: save a resumable state every N steps (0: only on Ctrl-C).
        resume: continue from the state an interrupted run saved.
        overwrite: replace `out`, and discard an unfinished run's state.
        progress: show the tqdm bar.
        on_step: called with (step, loss) after each optimizer step.

    Raises:
        PruneError: bad settings or folders, no teacher known, vocabularies that differ.
        KeyboardInterrupt: Ctrl-C, after saving a resumable state; its message says so.
    """
    import torch
    from tqdm.auto import tqdm

    from prune.calibration import load_calibration
    from prune.models import load_model, require_tokenizer
    from prune.surgery import count_layers

    settings.check()
    if checkpoint_every < 0:
        raise PruneError(f"checkpoint_every {checkpoint_every} (accepted: an integer >= 0)")
    variant, out = Path(variant), Path(out)
    record = pruned_record(variant)
    if teacher is None:
        if record is None:
            raise PruneError(
                f"'{variant}' has no {PRUNE_JSON}, so the model it was pruned from is unknown "
                "(pass --teacher MODEL)"
            )
        teacher = recorded_teacher(record)
        if teacher is None:
            raise PruneError(f"{variant / PRUNE_JSON} names no source model (pass --teacher MODEL)")
    if settings.method == "adjacent" and record is None:
        raise PruneError(
            f"--method adjacent needs the removed blocks from {variant / PRUNE_JSON}, "
            "which is missing (use --method lora or full)"
        )
    check_output_dir(out, overwrite)
    state_dir = state_dir_for(out)
    _prepare_state_dir(state_dir, resume, overwrite)
    texts = load_calibration(settings.calibration, samples=settings.samples, data_dir=data_dir)
    train_texts, heldout_texts = split_texts(texts, settings.seed)

    student = load_model(str(variant), dtype=settings.dtype, device=device)
    mentor = load_model(teacher, dtype=settings.dtype, device=device, tokenizer_for="healing")
    check_vocabularies(mentor, student, teacher)
    tokenizer = student.tokenizer or require_tokenizer(mentor, "healing")
    num_blocks = count_layers(student.model)
    blocks = None
    if settings.method == "adjacent":
        removed = record.get("removed_layers_original", record.get("removed_layers")) or []
        depth = record.get("num_layers_original", record.get("num_layers_before"))
        blocks = adjacent_blocks(removed, depth, num_blocks)
        if not blocks:
            raise PruneError(f"{variant / PRUNE_JSON} records no removed blocks to heal beside")
    train = chunk_tokens(tokenizer, train_texts, settings.seq_len)  # (N, T)
    heldout = chunk_tokens(tokenizer, heldout_texts, settings.seq_len)  # (M, T)
    teacher_model = mentor.model.requires_grad_(False).eval()
    dev = next(student.model.parameters()).device

    torch.manual_seed(settings.seed)  # LoRA's initial A matrices, dropout
    model = make_trainable(student.model, settings.method, blocks, settings.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    fingerprint = {**asdict(settings), "teacher": teacher, "variant": str(variant.resolve())}

    if resume:
        saved = _load_state(state_dir, fingerprint)
        unexpected = model.load_state_dict(saved["trainable"], strict=False).unexpected_keys
        if unexpected or set(saved["trainable"]) != set(trainable_state(model)):
            raise PruneError(
                f"the saved healing state in '{state_dir}' does not fit this model "
                "(pass --overwrite instead of --resume to start again)"
            )
        optimizer.load_state_dict(saved["optimizer"])
        state = _Progress(saved["step"], list(saved["losses"]), saved["seconds"], saved["rng"])
        _set_rng_state(state.rng)
        before = saved["before"]
        log.info("resuming at step %d of %d from %s", state.step, settings.steps, state_dir)
    else:
        started = time.perf_counter()
        before = heldout_scores(model, teacher_model, heldout, settings.batch_size, dev)
        state = _Progress(seconds=time.perf_counter() - started, rng=_rng_state())

    def save() -> None:
        _save_state(
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
            },
        )

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
                rows = batch_rows(
                    len(train),
                    settings.batch_size,
                    settings.seed,
                    state.step * settings.grad_accum + micro,
                )
                ids = train[rows].to(dev)  # (B, T)
                with torch.no_grad():
                    target = teacher_model(input_ids=ids).logits  # (B, T, V)
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
            state.rng = _rng_state()
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if on_step is not None:
                on_step(state.step, step_loss)
            if (
                checkpoint_every
                and state.step % checkpoint_every == 0
                and state.step < settings.steps
            ):
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

    started = time.perf_counter()
    if settings.method == "lora":
        model = model.merge_and_unload()  # plain transformers modules with merged weights
    model.eval()
    model.requires_grad_(False)
    after = heldout_scores(model, teacher_model, heldout, settings.batch_size, dev)
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
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "loss": loss_summary(state.losses),
        "heldout": compare_heldout(before, after, settings.seed),
        "seconds": round(state.seconds + time.perf_counter() - started, 1),
    }
    _export(student, model, variant, out, record, healing, num_blocks, overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)
    return HealResult(out, healing)


def _export(
    student: Any,
    model: Any,
    variant: Path,
    out: Path,
    record: Mapping[str, Any] | None,
    healing: dict[str, Any],
    num_blocks: int,
    overwrite: bool,
) -> None:
    """Write the healed model: no block removed in this step, so the chain in prune.json
    (see `prune.export`) keeps the variant's cut; the card is the variant's plus Healing."""
    from prune.export import export_checkpoint
    from prune.heal_card import healed_card
    from prune.models import LoadedModel

    try:
        card = (variant / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        card = None
    healed = LoadedModel(model, student.tokenizer, student.source, student.checkpoint_dir)

    def files(new_record: Mapping[str, Any]) -> dict[str, str]:
        return {"README.md": healed_card(card, record, new_record, str(variant))}

    export_checkpoint(
        healed, out, [], num_blocks, overwrite=overwrite, extra={"healing": healing}, files=files
    )
