"""Recipes: every shipped recipe validates; malformed ones list every problem with its path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from prune.cli import cli
from prune.errors import PruneError
from prune.measures import measure_names
from prune.recipe import RecipeError, apply_overrides, load_recipe, parse_recipe, target_removals
from prune.sizes import parse_size

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
GOOD = "model: smollm2-135m\nprune: {remove: 6}\n"


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m.yaml", "gemma3-270m.yaml"} <= names
    assert len(names) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path, resolve_depth=False)
    assert recipe.raw_text == path.read_text()
    assert len(recipe.strategies) >= 2
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


# (recipe text, depth, expected problem lines: each must appear in the error)
MALFORMED = [
    ("model: m\nprune: {remove: 31}\n", 30, ["prune.remove: must be < 30, got 31"]),
    ("model: m\nprune: {remove: 30}\n", 30, ["prune.remove: must be < 30, got 30"]),
    ("model: m\nprune: {keep: 30}\n", 30, ["prune.keep: must be < 30"]),
    (
        "model: m\nprune: {remove: 2, keep: 3}\n",
        30,
        ["prune: give only one of remove, keep, fraction (got remove and keep)"],
    ),
    (
        "model: m\nprune: {remove: 3, protect: [0, 1, 2, 3]}\n",
        4,
        ["prune.protect: protects 4 of 4 layers, so none can be removed"],
    ),
    ("model: m\nprune: {remove: 3, protect: [0, -1]}\n", 4, ["prune.remove: must be <= 1"]),
    (
        "model: m\nprune: {remove: 1, protect: [0, 40]}\n",
        30,
        ["prune.protect[1]: must be in 0..29 (or -30..-1), got 40"],
    ),
    (
        "model: m\nprune: {fraction: 1.5}\n",
        30,
        ["prune.fraction: must be between 0 and 1 (exclusive), got 1.5"],
    ),
    ("model: m\nprune: {}\n", 30, ["prune: give a stopping rule"]),
    (
        "model: m\nprune: {remove: 2, schedule: iterativ}\n",
        30,
        [
            "prune.schedule: must be one of one-shot, iterative, got 'iterativ' (did you mean 'iterative'?)"
        ],
    ),
    ("model: m\nprune: {remove: two}\n", 30, ["prune.remove: must be an integer, got 'two'"]),
    (
        "model: m\nprune: {remove: 2, max_drop: yes}\n",
        30,
        ["prune.max_drop: must be a number, got true"],
    ),
    (
        "model: m\nprune: {remove: 2, protect: 0}\n",
        30,
        ["prune.protect: must be a list of integers, got 0"],
    ),
    (
        "model: m\nprun: {remove: 2}\n",
        30,
        ["prun: unknown key (did you mean 'prune'?)", "prune: give a stopping rule"],
    ),
    (
        "model: m\nprune: {remove: 2, protec: [0]}\n",
        30,
        ["prune.protec: unknown key (did you mean 'protect'?)"],
    ),
    (
        "model: m\nstrategies: [cosine, acuracy]\nprune: {remove: 2}\n",
        30,
        ["strategies[1].name: unknown strategy 'acuracy' (did you mean 'accuracy'?)"],
    ),
    (
        "model: m\nstrategies: [cosine, cosine]\nprune: {remove: 2}\n",
        30,
        ["strategies[1]: a variant named 'cosine' is already listed"],
    ),
    ("model: m\nstrategies: []\nprune: {remove: 2}\n", 30, ["strategies: must list at least one"]),
    (
        "model: m\nstrategies: [{name: cosine, tasks: [local_piqa]}]\nprune: {remove: 2}\n",
        30,
        ["strategies[0].tasks: only the accuracy, probability, margin and kl strategies use tasks"],
    ),
    (
        "model: m\nstrategies: [{name: accuracy, limit: 0}]\nprune: {remove: 2}\n",
        30,
        ["strategies[0].limit: must be >= 1, got 0"],
    ),
    (
        "model: m\nevaluation: {tasks: [local_arc_esay]}\nprune: {remove: 2}\n",
        30,
        [
            "evaluation.tasks[0]: unknown local task 'local_arc_esay' (did you mean 'local_arc_easy'?)"
        ],
    ),
    (
        "model: m\nevaluation: {metric: accuracy}\nprune: {remove: 2}\n",
        30,
        ["evaluation.metric: must be one of acc, acc_norm"],
    ),
    (
        "model: m\ndtype: fp8\nprune: {remove: 2}\n",
        30,
        ["dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"],
    ),
    ("prune: {remove: 2}\n", 30, ["model: required"]),
    (
        "model: m\nprune: {remove: 2}\npush: {repo_id: 'me/x-{layer}'}\n",
        30,
        ["push.repo_id: unknown placeholder {layer}"],
    ),
    (
        "model: m\nprune: {remove: 2}\npush: {repo_id: me/x, publish: all}\n",
        30,
        [
            "push.publish: 'all' pushes every strategy's variant, so push.repo_id needs a {strategy} placeholder"
        ],
    ),
    (
        "model: m\nprune: {remove: 2}\npush: {enabled: true}\n",
        30,
        ["push.repo_id: required when push.enabled is true"],
    ),
    (
        "model: m\nprune: {remove: 2}\npush: {publish: perplexity}\n",
        30,
        ["push.publish: must be one of best, all, cosine, accuracy"],
    ),
    (
        "model: m\nprune: {remove: 2}\nexport: {max_shard_size: huge}\n",
        30,
        ["export.max_shard_size: must be a size like 2GB"],
    ),
    ("- a\n- b\n", 30, ["recipe: must be a mapping of settings, got list"]),
    ("model: [unclosed\n", 30, ["not valid YAML at line"]),
]


@pytest.mark.parametrize(
    ("text", "depth", "expected"), MALFORMED, ids=[m[2][0][:40] for m in MALFORMED]
)
def test_malformed_recipes_name_every_problem(text, depth, expected):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", depth=depth)
    message = str(info.value)
    for line in expected:
        assert line in message
    assert len(info.value.problems) == len(expected), info.value.problems


def test_all_problems_are_reported_together():
    text = "model: m\ndtyp: float32\nstrategies: [cosin]\nprune: {remove: 31, protec: [0]}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", depth=30)
    assert info.value.problems == [
        "dtyp: unknown key (did you mean 'dtype'?)",
        "prune.protec: unknown key (did you mean 'protect'?)",
        "strategies[0].name: unknown strategy 'cosin' (did you mean 'cosine'?); accepted: "
        + ", ".join(measure_names()),
        "prune.remove: must be < 30, got 31",
    ]
    assert str(info.value).startswith("recipe 'r.yaml' is invalid (4 problems):")


def test_depth_is_read_from_a_local_checkpoint(tiny_llama_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_llama_dir}\nprune: {{remove: 4}}\n")
    with pytest.raises(RecipeError, match=r"prune.remove: must be < 4, got 4"):
        load_recipe(path)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: recipe")
    assert "Traceback" not in result.output


def test_defaults_and_shorthands():
    recipe = parse_recipe(
        "model: m\nstrategies: [cosine, {name: accuracy, tasks: 'local_piqa,local_copa'}]\nprune: {fraction: 0.2}\n",
        depth=30,
    )
    assert recipe.strategy_names() == ["cosine", "accuracy"]
    assert recipe.strategies[1].tasks == ["local_piqa", "local_copa"]
    assert target_removals(recipe.prune, 30) == 6
    assert parse_recipe(GOOD, depth=30).strategy_names() == ["cosine", "accuracy"]
    assert recipe.raw_text.startswith("model: m")


def test_same_rank_and_report_tasks_warn():
    shared = parse_recipe(
        GOOD + "strategies: [cosine, {name: accuracy, tasks: [local_piqa]}]\n", depth=30
    )
    assert any("optimistic" in w for w in shared.warnings)
    separate = parse_recipe(
        GOOD + "strategies: [cosine, {name: accuracy, tasks: [local_arc_easy]}]\n", depth=30
    )
    assert separate.warnings == []


def test_ranking_and_report_tasks_default_to_disjoint_sets():
    recipe = parse_recipe(GOOD, depth=30)
    assert recipe.warnings == []
    assert recipe.evaluation.tasks == ["local_piqa", "local_copa", "local_openbookqa"]
    assert recipe.strategies[1].tasks == ["local_arc_easy", "local_winogrande"]
    assert recipe.strategies[0].tasks is None  # cosine ranks on the calibration text
    # a report on one of the default ranking tasks: the strategy ranks on the other
    own = parse_recipe(GOOD + "evaluation: {tasks: [local_arc_easy]}\n", depth=30)
    assert own.strategies[1].tasks == ["local_winogrande"] and own.warnings == []
    # nothing left unseen: rank on the report tasks, with the warning
    both = parse_recipe(
        GOOD + "evaluation: {tasks: [local_arc_easy, local_winogrande]}\n", depth=30
    )
    assert both.strategies[1].tasks == ["local_arc_easy", "local_winogrande"]
    assert any("optimistic" in w for w in both.warnings)


def test_overrides_are_applied_to_a_copy_and_reported():
    recipe = parse_recipe(GOOD + "push: {repo_id: 'me/m-{strategy}'}\n", depth=30)
    new, applied = apply_overrides(recipe, out=Path("x"), limit=5, device="cpu", push=True)
    assert applied == {"out": "x", "limit": 5, "device": "cpu", "push": True}
    assert new.evaluation.limit == 5 and new.strategies[1].limit == 5 and new.device == "cpu"
    assert new.push.enabled and new.export.out == "x"
    assert recipe.evaluation.limit is None and not recipe.push.enabled  # the original is untouched
    with pytest.raises(PruneError, match="push.repo_id"):
        apply_overrides(parse_recipe(GOOD, depth=30), push=True)


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "Error: recipe file" in result.output and "not found" in result.output


def test_a_rejected_key_does_not_hide_the_other_checks_of_its_section():
    text = "model: m\nprune: {remove: 40, schedule: 5, protec: [0]}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", depth=30)
    assert info.value.problems == [
        "prune.protec: unknown key (did you mean 'protect'?)",
        "prune.schedule: must be one of one-shot, iterative, got '5'",
        "prune.remove: must be < 30, got 40",
    ]
    with pytest.raises(RecipeError) as info:
        parse_recipe("model: m\nprune: {remove: two, keep: 3}\n", "r.yaml", depth=30)
    assert info.value.problems == [
        "prune.remove: must be an integer, got 'two'",
        "prune: give only one of remove, keep, fraction (got remove and keep)",
    ]


def test_entries_after_a_rejected_one_keep_their_place_in_the_file():
    text = "model: m\nstrategies: [5, cosin]\nprune: {remove: 2, protect: [0, a, 40]}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", depth=30)
    assert info.value.problems == [
        "strategies[0]: must be a mapping, got 5",
        "prune.protect[1]: must be an integer, got 'a'",
        "strategies[1].name: unknown strategy 'cosin' (did you mean 'cosine'?); accepted: "
        + ", ".join(measure_names()),
        "prune.protect[2]: must be in 0..29 (or -30..-1), got 40",
    ]


def test_unknown_keys_list_the_known_ones_and_bookkeeping_is_not_a_key():
    with pytest.raises(RecipeError) as info:
        parse_recipe("model: m\nraw_text: x\nprune: {remove: 2, xyzzy: 1}\n", depth=30)
    assert info.value.problems == [
        "raw_text: unknown key (known: model, dtype, device, device_map, max_memory, data_dir, "
        "seed, description, calibration, strategies, evaluation, prune, export, push, heal)",
        "prune.xyzzy: unknown key (known: schedule, remove, keep, fraction, max_drop, protect)",
    ]


def test_types_are_strict_but_numbers_stand_for_text_and_floats():
    recipe = parse_recipe(
        "model: 123\nprune: {fraction: 0.25, max_drop: 1}\nexport: {max_shard_size: 2000000}\n",
        depth=30,
    )
    assert recipe.model == "123" and recipe.export.max_shard_size == "2000000"
    assert isinstance(recipe.prune.max_drop, float) and recipe.prune.max_drop == 1.0
    with pytest.raises(RecipeError) as info:
        parse_recipe("model: m\nseed: '1'\nprune: {remove: 2.0, protect: [0, x]}\n", depth=30)
    assert info.value.problems == [
        "seed: must be an integer, got '1'",
        "prune.remove: must be an integer, got 2.0",
        "prune.protect[1]: must be an integer, got 'x'",
    ]


def test_settings_keep_their_json_shape():
    recipe = parse_recipe(GOOD, depth=30)
    settings = json.loads(json.dumps(recipe.to_dict()))
    assert list(settings) == [
        "model", "dtype", "device", "device_map", "max_memory", "data_dir", "seed",
        "description", "calibration", "strategies", "evaluation", "prune", "export", "push",
        "heal",
    ]  # fmt: skip
    # the effective ranking tasks are written out (cosine ranks on the calibration text)
    assert settings["strategies"] == [
        {
            "name": n,
            "tasks": t,
            "limit": None,
            "num_fewshot": None,
            "metric": None,
            "span": 1,
            "schedule": None,
            "rescore": None,
            "adaptive": False,
            "variant": None,
        }
        for n, t in (("cosine", None), ("accuracy", ["local_arc_easy", "local_winogrande"]))
    ]
    assert settings["calibration"] == {
        "source": None,
        "samples": 64,
        "seq_len": 256,
        "batch_size": 8,
    }
    assert settings["export"] == {"out": None, "max_shard_size": "2GB"}
    assert settings["prune"]["remove"] == 6 and settings["prune"]["protect"] == []
    assert settings["heal"] is None  # no section, no healing


def test_every_registered_measure_is_a_strategy():
    names = ", ".join(measure_names())
    recipe = parse_recipe(f"model: m\nstrategies: [{names}]\nprune: {{remove: 2}}\n", depth=30)
    assert recipe.strategy_names() == list(measure_names())
    with pytest.raises(
        RecipeError,
        match=r"strategies\[0\]\.tasks: only the accuracy, probability, margin and kl strategies",
    ):
        parse_recipe(
            "model: m\nstrategies: [{name: angular, tasks: [local_piqa]}]\nprune: {remove: 2}\n",
            depth=30,
        )


# (as written in the recipe, bytes)
SHARD_SIZES = [
    ("1.5GB", 1_500_000_000),
    ("2TB", 2 * 10**12),
    ("500MiB", 500 * 2**20),
    ("2000000", 2_000_000),
    (2000000, 2_000_000),
    ("1 kib", 2**10),
]


@pytest.mark.parametrize(("size", "expected"), SHARD_SIZES, ids=lambda s: str(s))
def test_a_shard_size_validate_accepts_is_what_the_export_parses(size, expected, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: m\nprune: {{remove: 2}}\nexport: {{max_shard_size: {size}}}\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert parse_size(load_recipe(path).export.max_shard_size) == expected


def test_every_shard_size_that_validates_parses_to_positive_bytes():
    accepted = 0
    for number in ("0", "1", "1.5", "0.0001", "2000000", "-1"):
        for unit in ("", "B", "kb", "MiB", " GB", "TiB", "XB", "bytes"):
            text = f"model: m\nprune: {{remove: 2}}\nexport: {{max_shard_size: '{number}{unit}'}}\n"
            try:
                recipe = parse_recipe(text, depth=30)
            except RecipeError as exc:
                assert exc.problems == [
                    f"export.max_shard_size: must be a size like 2GB, 500MB or 1.5GiB (units B, KB, "
                    f"MB, GB, TB, KiB, MiB, GiB, TiB) or a number of bytes, above 0, got '{number}{unit}'"
                ]
                continue
            assert parse_size(recipe.export.max_shard_size) > 0
            accepted += 1
    assert accepted == 3 * 6 + 3  # 1, 1.5, 2000000 with each real unit; 0.0001 in MiB, GB, TiB


@pytest.mark.parametrize("size", ["0GB", "2XB", "lots"])
def test_a_bad_shard_size_fails_validation_naming_it(size, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: m\nprune: {{remove: 2}}\nexport: {{max_shard_size: {size}}}\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1
    assert "export.max_shard_size: must be a size like 2GB, 500MB or 1.5GiB" in result.output
    assert f"got '{size}'" in result.output and "Traceback" not in result.output


def test_default_calibration_text_overlapping_a_report_task_warns(tmp_path):
    lambada = GOOD + "evaluation: {tasks: [local_piqa, local_lambada]}\n"
    warned = parse_recipe(lambada, depth=30).warnings
    assert any("first LAMBADA passages" in w and "cosine" in w for w in warned)
    texts = tmp_path / "texts.txt"  # a calibration file must exist (pre-flight check)
    texts.write_text("some text of our own\n")
    own_text = parse_recipe(lambada + f"calibration: {{source: {texts}}}\n", depth=30)
    assert not any("LAMBADA" in w for w in own_text.warnings)
    assert not any("LAMBADA" in w for w in parse_recipe(GOOD, depth=30).warnings)


@pytest.mark.parametrize(
    "strategies, prune, problem",
    [
        (
            "[{name: kl, span: 4}]",
            "{remove: 6}",
            "strategies[0].span: 4 does not divide prune.remove 6",
        ),
        (
            "[{name: kl, span: 3}]",
            "{keep: 26}",
            "strategies[0].span: 3 does not divide the 4 blocks",
        ),
        ("[{name: kl, span: 30}]", "{remove: 30}", "strategies[0].span: must be <= 29"),
        ("[{name: kl, span: 0}]", "{remove: 2}", "strategies[0].span: must be >= 1"),
        ("[{name: kl, rescore: 4}]", "{remove: 2}", "strategies[0].rescore: applies to measured"),
        (
            "[{name: cosine, schedule: iterative, rescore: 4}]",
            "{remove: 2}",
            "strategies[0].rescore: applies to measured strategies",
        ),
        ("[{name: kl, schedule: sideways}]", "{remove: 2}", "strategies[0].schedule:"),
        (
            "[kl, {name: kl, variant: kl}]",
            "{remove: 2}",
            "strategies[1]: a variant named 'kl' is already",
        ),
        ("[{name: kl, variant: 'a/b'}]", "{remove: 2}", "strategies[0].variant: 'a/b' is not"),
        ("[{name: cosine, adaptive: true}]", "{remove: 2}", "strategies[0].adaptive: applies to"),
        ("[{name: kl, adaptive: true}]", "{remove: 2}", "strategies[0].adaptive: needs a document"),
        (
            "[{name: kl, adaptive: true, limit: 100}]",
            "{max_drop: 0.1}",
            "strategies[0].adaptive: needs a number of blocks",
        ),
    ],
)
def test_span_schedule_and_rescore_fields_are_checked(strategies, prune, problem):
    with pytest.raises(RecipeError) as info:
        parse_recipe(f"model: m\nstrategies: {strategies}\nprune: {prune}\n", depth=30)
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems


def test_variants_are_named_by_measure_span_and_schedule():
    recipe = parse_recipe(
        "model: m\nstrategies: [cosine, {name: angular, span: 2}, "
        "{name: kl, schedule: iterative, rescore: 4}, {name: kl, variant: mine}]\n"
        "prune: {remove: 4}\n",
        depth=30,
    )
    keys = [s.key(recipe.prune.schedule) for s in recipe.strategies]
    assert keys == ["cosine", "angular-span2", "kl-iterative", "mine"]


def test_the_readme_recipe_reference_is_a_valid_recipe():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Recipe reference", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(block, depth=30)
    keys = [s.key(recipe.prune.schedule) for s in recipe.strategies]
    assert keys == ["cosine", "accuracy", "kl-span2", "kl-lazy"]


# (heal section, the one problem it must produce)
BAD_HEAL = [
    ("{stepz: 3}", "heal.stepz: unknown key (did you mean 'steps'?)"),
    ("{steps: 0}", "heal.steps: must be >= 1, got 0"),
    ("{method: foo}", "heal.method: must be one of lora, full, adjacent, got 'foo'"),
    ("{method: ful}", "heal.method: must be one of lora, full, adjacent, got 'ful' (did you mean"),
    ("{steps: two}", "heal.steps: must be an integer, got 'two'"),
    ("{lr: 0}", "heal.lr: must be a finite number > 0, got 0"),
    ("{lr: fast}", "heal.lr: must be a number, got 'fast'"),
    ("{lm_weight: -1}", "heal.lm_weight: must be a finite number >= 0, got -1"),
    ("{lm_weight: .inf}", "heal.lm_weight: must be a finite number >= 0, got inf"),
    ("{seq_len: 1}", "heal.seq_len: must be >= 2, got 1"),
    ("{samples: 1}", "heal.samples: must be >= 2 (one text to train on, one held out), got 1"),
    ("{dtype: fp8}", "heal.dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    ("{calibration: missing/texts.txt}", "heal.calibration: "),
    ("5", "heal: must be a mapping, got 5"),
]


@pytest.mark.parametrize(("section", "problem"), BAD_HEAL, ids=[b[0] for b in BAD_HEAL])
def test_a_bad_heal_section_is_one_clear_problem(section, problem):
    with pytest.raises(RecipeError) as info:
        parse_recipe(GOOD + f"heal: {section}\n", "r.yaml", depth=30)
    (line,) = info.value.problems
    assert line.startswith(problem), line


def test_a_heal_section_maps_onto_heal_settings():
    from prune.heal import HealSettings
    from prune.pipeline import heal_settings

    assert parse_recipe(GOOD, depth=30).heal is None
    empty = parse_recipe(GOOD + "heal:\n", depth=30)  # an empty section heals with the defaults
    assert heal_settings(empty) == HealSettings()
    recipe = parse_recipe(
        GOOD + "seed: 7\ndtype: float32\ncalibration: {source: default}\n"
        "heal: {method: full, steps: 3, lr: 1e-5, samples: 16, teacher: other/model}\n",
        depth=30,
    )
    assert recipe.heal.teacher == "other/model" and recipe.heal.lr == 1e-5  # YAML's '1e-5' text
    settings = heal_settings(recipe)
    assert settings == HealSettings(
        method="full", steps=3, lr=1e-5, samples=16, seed=7, dtype="float32", calibration=None
    )
    settings.check()  # what validates here, heal_variant accepts


def test_healing_adds_healed_variants_to_what_publish_accepts():
    healing = GOOD + "heal: {steps: 2}\n"
    recipe = parse_recipe(
        healing + "push: {repo_id: 'me/m-{strategy}', publish: cosine-healed}\n", depth=30
    )
    assert recipe.variant_names() == ["cosine", "accuracy", "cosine-healed", "accuracy-healed"]
    with pytest.raises(RecipeError, match="push.publish: must be one of"):
        parse_recipe(
            GOOD + "push: {repo_id: 'me/m-{strategy}', publish: cosine-healed}\n", depth=30
        )
    # one strategy and its healed copy are two repos: 'all' needs the placeholder
    with pytest.raises(RecipeError, match=r"'all' pushes every strategy's variant"):
        parse_recipe(
            "model: m\nstrategies: [cosine]\nprune: {remove: 2}\nheal: {}\n"
            "push: {repo_id: me/m, publish: all}\n",
            depth=30,
        )
    with pytest.raises(RecipeError, match=r"strategies\[1\]: the variant name 'cosine-healed'"):
        parse_recipe(
            "model: m\nstrategies: [cosine, {name: kl, variant: cosine-healed}]\n"
            "prune: {remove: 2}\nheal: {}\n",
            depth=30,
        )


def test_healing_on_the_default_text_while_reporting_lambada_warns():
    lambada = GOOD + "evaluation: {tasks: [local_piqa, local_lambada]}\nheal: {steps: 2}\n"
    assert any(w.startswith("heal: trains on") for w in parse_recipe(lambada, depth=30).warnings)
    assert not any(w.startswith("heal:") for w in parse_recipe(GOOD + "heal:\n", depth=30).warnings)
