"""`prune push` end to end with the real huggingface_hub client against tests/hub_server.py.

The `hub` fixture (conftest.py) starts the server. Every push goes through the CLI; what arrives on the server is read back with
`snapshot_download` and `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.errors
import pytest
import torch
from click.testing import CliRunner
from hub_server import OTHER_TOKEN, OTHER_USER, USER, VALID_TOKEN, HubServer
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForCausalLM

from prune import hub as prune_hub
from prune.cli import cli
from prune.errors import PruneError

REPO = f"{USER}/tiny-pruned"
CARD = """---
base_model: tests/tiny-llama
library_name: transformers
pipeline_tag: text-generation
license: apache-2.0
tags:
- pruned
- layer-pruning
---
# tiny-llama, 1 block removed

| variant | removed layers | layers | arc_easy |
|---|---|---|---|
| base | - | 4 | 31.0 |
| cosine | 1 | 3 | 29.5 |
"""


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A 4-layer tiny Llama with layer 1 removed by `prune drop`, plus a model card."""
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("hub")
    source = save_tiny_checkpoint(root / "tiny-llama", "llama", num_layers=4)
    out = root / "pruned"
    result = CliRunner().invoke(cli, ["drop", str(source), "--layers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (out / "README.md").write_text(CARD)
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def push(
    server: HubServer, folder: Path, *extra: str, repo: str = REPO, token: str | None = VALID_TOKEN
):
    args = ["push", str(folder), "--repo-id", repo, "--endpoint", server.url, *extra]
    if token is not None:
        args += ["--token", token]
    return CliRunner().invoke(cli, args)


def download(
    server: HubServer, tmp_path: Path, repo: str = REPO, token=VALID_TOKEN, **kwargs
) -> Path:
    return Path(
        snapshot_download(
            repo, endpoint=server.url, token=token, cache_dir=tmp_path / "dl", **kwargs
        )
    )


def error_line(result) -> str:
    """The CLI's error output: exactly one `Error: ...` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, PruneError) or "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_download_load_same_logits(hub, pruned_dir, tmp_path):
    result = push(hub, pruned_dir)
    assert result.exit_code == 0, result.output
    head = hub.head(REPO)
    assert f"repo:   {hub.url}/{REPO}" in result.output
    assert f"commit: {head} on main (new commit)" in result.output
    assert len(hub.commits(REPO)) == 2  # the repo's initial commit + ours
    assert VALID_TOKEN not in result.output

    local = download(hub, tmp_path)
    assert local.name == head  # snapshot of the pushed commit
    assert digest(local) == {
        **digest(pruned_dir),
        ".gitattributes": digest(local)[".gitattributes"],
    }
    assert hub.files(REPO)["model.safetensors"].lfs  # weights went through the LFS batch API

    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
    assert torch.equal(expected, got)
    assert AutoModelForCausalLM.from_pretrained(local).config.num_hidden_layers == 3


def test_pushed_card_metadata_parses_and_table_renders(hub, pruned_dir, tmp_path):
    assert push(hub, pruned_dir).exit_code == 0
    card = ModelCard.load(download(hub, tmp_path) / "README.md", ignore_metadata_errors=False)
    assert card.data.base_model == "tests/tiny-llama"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["pruned", "layer-pruning"]
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card.text)
    assert html.count("<table>") == 1
    assert (
        "<th>removed layers</th>" in html and "<td>cosine</td>" in html and "<td>29.5</td>" in html
    )


def test_unchanged_repush_makes_no_commit(hub, pruned_dir, tmp_path):
    assert push(hub, pruned_dir).exit_code == 0
    first = hub.head(REPO)
    again = push(hub, pruned_dir)
    assert again.exit_code == 0, again.output
    assert f"commit: {first} on main (unchanged, no new commit)" in again.output
    assert len(hub.commits(REPO)) == 2

    # A changed card is one new commit that touches only README.md.
    folder = copy_of(pruned_dir, tmp_path)
    (folder / "README.md").write_text(CARD + "\nMore text.\n")
    changed = push(hub, folder)
    assert "(new commit)" in changed.output
    commits = hub.commits(REPO)
    assert len(commits) == 3
    before, after = commits[1].files, commits[2].files
    assert {p for p in after if after[p].data != before[p].data} == {"README.md"}


def test_private_repo_needs_the_token(hub, pruned_dir, tmp_path):
    assert push(hub, pruned_dir, "--private").exit_code == 0
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        download(hub, tmp_path / "anon", token=False)
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        download(hub, tmp_path / "other", token=OTHER_TOKEN)
    assert (download(hub, tmp_path / "owner") / "model.safetensors").is_file()


def test_private_flag_refuses_existing_public_repo(hub, pruned_dir):
    assert push(hub, pruned_dir).exit_code == 0
    line = error_line(push(hub, pruned_dir, "--private"))
    assert "already exists and is public" in line
    assert len(hub.commits(REPO)) == 2


def test_wrong_token_is_a_401_line(hub, pruned_dir):
    bad = "hf_wrong_token_abcdefghijklmnop"
    result = push(hub, pruned_dir, token=bad)
    line = error_line(result)
    assert line.startswith("Error: authentication failed (401")
    assert bad not in result.output
    assert REPO not in hub.state.repos


def test_token_from_env_and_stored_login(hub, pruned_dir, monkeypatch, tmp_path):
    result = push(hub, pruned_dir, token=None)
    assert "no Hugging Face token" in error_line(result)
    assert hub.requests == []

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    assert push(hub, pruned_dir, token=None).exit_code == 0
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "stored-token").write_text(VALID_TOKEN)  # what `hf auth login` writes
    result = push(hub, pruned_dir, repo=f"{USER}/from-login", token=None)
    assert result.exit_code == 0, result.output


def test_endpoint_from_hf_endpoint(hub, pruned_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = CliRunner().invoke(
        cli, ["push", str(pruned_dir), "--repo-id", REPO, "--token", VALID_TOKEN]
    )
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/{REPO}" in result.output


def test_other_namespace_is_a_403_line(hub, pruned_dir):
    line = error_line(push(hub, pruned_dir, repo=f"{OTHER_USER}/stolen"))
    assert line.startswith("Error: permission denied (403)") and f"'{OTHER_USER}/stolen'" in line
    # A public repo that exists under someone else's name: readable, but not writable.
    hub.add_repo(f"{OTHER_USER}/theirs", OTHER_USER)
    line = error_line(push(hub, pruned_dir, repo=f"{OTHER_USER}/theirs"))
    assert line.startswith("Error: permission denied (403)")
    assert len(hub.commits(f"{OTHER_USER}/theirs")) == 1


def _truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _more_layers_in_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))


def _index_without_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN = {
    "no config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "has no weights"),
    "truncated weights": (_truncate_weights, "not a readable safetensors file"),
    "config and weights disagree": (
        _more_layers_in_config,
        "do not match config.json: tensors 9 missing",
    ),
    "index names a missing shard": (_index_without_shard, "which is missing from the folder"),
    "single file and index": (
        lambda f: (f / "model.safetensors.index.json").write_text("{}"),
        "remove the stale one",
    ),
    "bad yaml": (
        lambda f: (f / "README.md").write_text("---\ntags: [a\n---\ntext\n"),
        "does not parse",
    ),
    "unclosed front matter": (
        lambda f: (f / "README.md").write_text("---\ntags: [a]\n"),
        "not closed",
    ),
    "metadata not a mapping": (
        lambda f: (f / "README.md").write_text("---\n- a\n---\n"),
        "invalid model card metadata",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_folder_refused_before_any_request(hub, pruned_dir, tmp_path, case):
    folder = copy_of(pruned_dir, tmp_path)
    breaker, expected = BROKEN[case]
    breaker(folder)
    before = digest(folder)
    line = error_line(push(hub, folder))
    assert expected in line
    assert hub.requests == []
    assert digest(folder) == before


def test_server_down_is_a_network_line(hub, pruned_dir):
    url = hub.url
    hub.stop()
    result = CliRunner().invoke(
        cli, ["push", str(pruned_dir), "--repo-id", REPO, "--endpoint", url, "--token", VALID_TOKEN]
    )
    line = error_line(result)
    assert line.startswith(f"Error: cannot reach the Hub at {url}")
    assert "refused" in line.lower()


def test_server_error_keeps_folder_and_can_be_retried(hub, pruned_dir):
    before = digest(pruned_dir)
    hub.fail("POST", r"/commit/", status=500)
    line = error_line(push(hub, pruned_dir))
    assert line.startswith(f"Error: server error 500 from {hub.url}")
    assert "Internal Error" in line and "retry with `prune push`" in line
    assert digest(pruned_dir) == before
    assert len(hub.commits(REPO)) == 1  # repo created, nothing committed
    retry = push(hub, pruned_dir)
    assert retry.exit_code == 0, retry.output
    assert len(hub.commits(REPO)) == 2


def test_revision_creates_branch_and_create_pr_opens_one(hub, pruned_dir):
    assert push(hub, pruned_dir, "--revision", "experiments").exit_code == 0
    main = hub.head(REPO)
    assert len(hub.commits(REPO)) == 2 and hub.head(REPO, "experiments") != main
    assert "model.safetensors" not in hub.files(REPO, "main")

    result = push(hub, pruned_dir, "--create-pr", "--commit-message", "Add the pruned model")
    assert result.exit_code == 0, result.output
    assert f"pull request: {hub.url}/{REPO}/discussions/1" in result.output
    assert hub.head(REPO) == main  # main untouched
    assert hub.commits(REPO)[-1].title == "Add the pruned model"
    assert "model.safetensors" in hub.files(REPO, "refs/pr/1")

    line = error_line(push(hub, pruned_dir, "--create-pr", "--revision", "experiments"))
    assert "cannot be combined with --revision experiments" in line


def test_stale_weight_files_are_removed_on_repush(hub, pruned_dir, tmp_path):
    assert push(hub, pruned_dir).exit_code == 0
    sharded = tmp_path / "sharded"
    source = tmp_path / "source"
    assert (
        CliRunner()
        .invoke(cli, ["drop", str(pruned_dir), "--layers", "0", "--out", str(source)])
        .exit_code
        == 0
    )
    result = CliRunner().invoke(
        cli,
        [
            "drop",
            str(pruned_dir),
            "--layers",
            "0",
            "--out",
            str(sharded),
            "--max-shard-size",
            "60KB",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (sharded / "model.safetensors.index.json").is_file()
    assert push(hub, sharded).exit_code == 0
    remote = set(hub.files(REPO))
    assert "model.safetensors" not in remote and "model.safetensors.index.json" in remote
    assert (
        AutoModelForCausalLM.from_pretrained(download(hub, tmp_path)).config.num_hidden_layers == 2
    )


def test_render_repo_id():
    assert (
        prune_hub.render_repo_id("me/smollm2-{strategy}-{layers}L", "cosine", 24)
        == "me/smollm2-cosine-24L"
    )
    assert (
        prune_hub.render_repo_id("me/m-drop-{layers}", "accuracy", [3, 7, 12]) == "me/m-drop-3-7-12"
    )
    assert prune_hub.render_repo_id("me/fixed", "accuracy", 24) == "me/fixed"
    assert prune_hub.repo_id_placeholders("me/x-{strategy}") == {"strategy"}
    with pytest.raises(
        PruneError, match=r"unknown placeholder \{model\}.*accepted: \{strategy\}, \{layers\}"
    ):
        prune_hub.render_repo_id("me/{model}-{strategy}", "cosine", 3)
    with pytest.raises(PruneError, match="malformed"):
        prune_hub.render_repo_id("me/{strategy", "cosine", 3)
    with pytest.raises(PruneError, match="invalid repo id 'me/a b-cosine'"):
        prune_hub.render_repo_id("me/a b-{strategy}", "cosine", 3)
    with pytest.raises(PruneError, match="invalid repo id"):
        prune_hub.render_repo_id("no-namespace-{strategy}", "cosine", 3)


def test_push_many_checks_everything_first(hub, pruned_dir, tmp_path):
    broken = copy_of(pruned_dir, tmp_path)
    (broken / "config.json").unlink()
    with pytest.raises(PruneError, match="has no config.json"):
        prune_hub.push_many(
            [(pruned_dir, f"{USER}/a"), (broken, f"{USER}/b")], token=VALID_TOKEN, endpoint=hub.url
        )
    with pytest.raises(PruneError, match="would both be pushed"):
        prune_hub.push_many(
            [(pruned_dir, f"{USER}/a"), (broken, f"{USER}/a")], token=VALID_TOKEN, endpoint=hub.url
        )
    assert hub.requests == []
    results = prune_hub.push_many(
        [(pruned_dir, f"{USER}/a"), (pruned_dir, f"{USER}/b")], token=VALID_TOKEN, endpoint=hub.url
    )
    assert [r.repo_url for r in results] == [f"{hub.url}/{USER}/a", f"{hub.url}/{USER}/b"]
    assert all(r.created_commit for r in results)


def test_folder_without_card_warns_and_still_pushes(hub, pruned_dir, tmp_path):
    folder = copy_of(pruned_dir, tmp_path)
    (folder / "README.md").unlink()
    result = push(hub, folder)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "no README.md" in warnings[0], result.stderr
    assert "Warning" not in result.stdout
    assert "README.md" not in hub.files(REPO)
    assert "model.safetensors" in hub.files(REPO)  # pushed all the same

    with_card = push(hub, pruned_dir)
    assert with_card.exit_code == 0 and "Warning" not in with_card.stderr, with_card.output
