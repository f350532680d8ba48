"""Bad and unusual inputs, end to end through the scripts a user runs (issue 11's check).

Every case either exits non-zero with one `error:` line and no traceback, or succeeds; and in every case
no file the user already had is lost or altered. The CLIs of prepare_data, prune_to_dense and eval_domains
run in process; scripts/train.py runs as a real process (single rank, plus one `composer -n 2` case).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from drpruning.data.manifest import load_manifest
from drpruning.data.prepare_cli import main as prepare_data_main
from drpruning.demo.tiny import make_tiny_tokenizer, tiny_documents
from drpruning.errors import ConfigError
from drpruning.evaluation import main as eval_domains_main
from drpruning.export.convert import main as prune_to_dense_main
from tests.helpers import REPO

pytestmark = pytest.mark.slow

SEQ_LEN = 64  # the tiny recipes' max_seq_len
TINY = "yamls/tiny/prune_llama_gqa.yaml"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes; symlinks by their target."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            tree[key] = os.readlink(path).encode()
        elif path.is_file():
            tree[key] = path.read_bytes()
    return tree


def _one_error_line(stderr: str) -> str:
    """The single `error:` line of a refused command; fails on tracebacks or repeated errors."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line and not line.startswith("ERROR:composer")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _prepare(capsys, *args: str) -> tuple[int, str, str]:
    code = prepare_data_main(["--no-progress", "--seq-len", str(SEQ_LEN), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(overrides: list[str], launcher: list[str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), "scripts/train.py", TINY, *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _short_run(assets: Path, data: Path, folder: Path) -> list[str]:
    return [
        f"variables.assets={assets}", f"variables.data={data}", f"save_folder={folder}", "max_duration=2ba",
        "variables.update_interval=2", "save_interval=2ba", "model.l0_module.lagrangian_warmup=1ba",
        "scheduler.t_warmup=1ba", "callbacks.data_scheduler.min_points=5", "run_name=bad-inputs",
        "console_log_interval=1ba", "train_loader.proportions={news: 0.5, snippets: 0.5}",
    ]


@pytest.fixture(scope="module")
def own(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's own two-domain corpus prepared with the tiny models' tokenizer, and a 2-batch pruning run on
    it with the shipped tiny recipe, its domains replaced from the command line."""
    root = tmp_path_factory.mktemp("own")
    (root / "news").mkdir()
    for i in range(2):  # two long documents
        (root / "news" / f"part{i}.txt").write_text("\n\n".join(tiny_documents("prose", 120, seed=i)))
    (root / "snippets.txt").write_text("\n\n".join(tiny_documents("code", 150)))  # one long document
    data = root / "data"
    code = prepare_data_main(["--no-progress", "--tokenizer", str(tiny_assets / "tokenizer"), "--seq-len",
                              str(SEQ_LEN), "--eval-sequences", "4", "--out", str(data),
                              "--domain", f"news={root / 'news'}", "--domain", f"snippets={root / 'snippets.txt'}"])
    assert code == 0
    run = root / "run"
    result = _train(_short_run(tiny_assets, data, run))
    assert result.returncode == 0, result.stderr[-5000:]
    return {"root": root, "data": data, "run": run}


# ---- prepare_data ------------------------------------------------------------------------------------------


def test_the_eval_split_of_a_two_document_corpus_drops_only_partial_sequences(own, tiny_assets):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets / "tokenizer"))
    manifest = load_manifest(own["data"])
    news, snippets = manifest["domains"]
    lengths = {path.name: len(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]) + 1
               for path in [*sorted((own["root"] / "news").iterdir()), own["root"] / "snippets.txt"]}  # fmt: skip
    for domain, total in ((news, lengths["part0.txt"] + lengths["part1.txt"]), (snippets, lengths["snippets.txt"])):
        assert domain["eval"]["tokens"] + domain["train"]["tokens"] + domain["dropped_tokens"] == total
        assert domain["dropped_tokens"] < SEQ_LEN
    assert news["documents"] == 2 and snippets["documents"] == 1


def test_prepare_data_refusals_keep_every_file(own, tiny_assets, tmp_path, capsys):
    tokenizer = ["--tokenizer", str(tiny_assets / "tokenizer"), "--eval-sequences", "4"]
    domain = ["--domain", f"news={own['root'] / 'news'}"]
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "NOTES.md").write_text("notes")
    (mine / "sub" / "other_model.safetensors").write_bytes(b"weights")
    with_raw = tmp_path / "with_raw"
    (with_raw / "raw").mkdir(parents=True)
    (with_raw / "raw" / "web.txt").write_text("\n".join(tiny_documents("facts", 200)))
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    cases = [
        ([*tokenizer, "--out", str(mine), *domain], "is not empty; pass --overwrite"),
        ([*tokenizer, "--out", str(mine), *domain, "--overwrite"], "is not a prepare_data output"),
        ([*tokenizer, "--out", str(with_raw), "--domain", f"web={with_raw / 'raw'}", "--overwrite"],
         "contains input file"),
        ([*tokenizer, "--out", str(tmp_path / "new"), "--domain", f"blob={tmp_path / 'blob.bin'}"],
         "a binary file, which prepare_data cannot read; accepted: plain text"),
        ([*tokenizer, "--out", str(own["data"]), *domain], "is not empty; pass --overwrite"),
    ]
    before = _tree(tmp_path), _tree(own["root"])
    for args, message in cases:
        code, _, err = _prepare(capsys, *args)
        assert code == 2 and message in _one_error_line(err), (args, err)
        assert (_tree(tmp_path), _tree(own["root"])) == before, args


def test_prepare_data_reads_unusual_inputs_and_reports_the_token_counts(own, tiny_assets, tmp_path, capsys):
    lines = [json.dumps({"text": text, "meta": {"url": "https://example.org"}}) for text in tiny_documents("math", 200)]
    lines[5] = '{"text": "a web scrape with a lone surrogate \\ud800 in it"}'
    (tmp_path / "scrape.json").write_text("\n".join(lines) + "\n")  # JSON lines in a .json file
    code, out, err = _prepare(capsys, "--tokenizer", str(tiny_assets / "tokenizer"), "--eval-sequences", "4",
                              "--out", str(tmp_path / "out"), "--domain", f"scrape={tmp_path / 'scrape.json'}")
    assert code == 0, err
    scrape = load_manifest(tmp_path / "out")["domains"][0]
    assert scrape["documents"] == 200 and scrape["replaced_surrogates"] == 1
    assert f"scrape: {scrape['train']['tokens']:,} train / {scrape['eval']['tokens']:,} eval / " in out
    assert "replaced 1 lone surrogate(s)" in out
    # --overwrite replaces an earlier output, nothing else in the folder
    (tmp_path / "out" / "NOTES.md").write_text("notes")
    code, _, err = _prepare(capsys, "--tokenizer", str(tiny_assets / "tokenizer"), "--eval-sequences", "2",
                            "--out", str(tmp_path / "out"), "--domain", f"scrape={tmp_path / 'scrape.json'}",
                            "--overwrite")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "out" / "NOTES.md").read_text() == "notes"
    assert load_manifest(tmp_path / "out")["eval_sequences"] == 2


# ---- prune_to_dense and eval_domains ---------------------------------------------------------------------


def test_prune_to_dense_refusals_keep_every_file(own, tmp_path, capsys):
    run = own["run"]
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "NOTES.md").write_text("notes")
    (mine / "sub" / "other_model.safetensors").write_bytes(b"weights")
    before = _tree(own["root"]), _tree(tmp_path)
    for out, message in ((run, "is the input"), (run.parent, "contains the input"), (run / "export", "lies inside"),
                         (mine, "not a previous export")):  # fmt: skip
        assert prune_to_dense_main([str(run), str(out), "--overwrite", "--no-verify"]) == 2
        assert message in _one_error_line(capsys.readouterr().err)
        assert (_tree(own["root"]), _tree(tmp_path)) == before, out


def test_export_then_eval_domains_checks_the_tokenizer(own, tiny_assets, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert prune_to_dense_main([str(own["run"]), str(dense)]) == 0, capsys.readouterr().err
    assert prune_to_dense_main([str(own["run"]), str(dense), "--overwrite"]) == 0  # a previous export is replaced
    capsys.readouterr()
    assert eval_domains_main([str(dense), str(own["data"]), "--max-sequences", "2"]) == 0
    assert "news" in capsys.readouterr().out
    # the same text tokenized by another tokenizer with fewer ids: the old vocabulary-size check let it through
    make_tiny_tokenizer(tmp_path / "other", vocab_size=300)
    code, _, err = _prepare(capsys, "--tokenizer", str(tmp_path / "other"), "--eval-sequences", "4", "--out",
                            str(tmp_path / "other_data"), "--domain", f"news={own['root'] / 'news'}")
    assert code == 0, err
    before = _tree(tmp_path)
    assert eval_domains_main([str(dense), str(tmp_path / "other_data")]) == 2
    assert "was tokenized with another tokenizer" in _one_error_line(capsys.readouterr().err)
    assert _tree(tmp_path) == before


# ---- train.py ----------------------------------------------------------------------------------------------


def test_own_domains_from_the_command_line_train_with_a_shipped_recipe(own):
    schedule = [json.loads(line) for line in (own["run"] / "schedule.jsonl").read_text().splitlines()]
    assert [line["step"] for line in schedule] == [2]
    assert set(schedule[0]["proportions"]) == {"news", "snippets"}
    assert (own["run"] / "ep0-ba2-rank0.pt").exists()


def test_a_new_run_in_a_used_folder_and_a_short_max_seq_len_are_refused_without_changes(own, tiny_assets):
    before = _tree(own["run"])
    overrides = _short_run(tiny_assets, own["data"], own["run"])
    for extra, message in ((["autoresume=false"], "holds an earlier run"),
                           (["autoresume=false", "max_seq_len=32"], "max_seq_len 32 is shorter than the seq_len 64")):
        result = _train([*overrides, *extra])
        assert result.returncode == 2, result.stderr[-5000:]
        assert message in _one_error_line(result.stderr)
        assert _tree(own["run"]) == before


def test_a_config_error_under_composer_is_one_line(own, tiny_assets, tmp_path):
    composer = [str(Path(sys.executable).with_name("composer")), "-n", "2"]
    result = _train([*_short_run(tiny_assets, own["data"], tmp_path / "run"), "callbacks.data_scheduler.policy=doremi"],
                    launcher=composer)  # fmt: skip
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert line == "error: unknown policy 'doremi'; choose one of constant, sheared, dro, drpruning"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("typo", "message"), [
    ("model.pretrainde=true", "model (drpruning_causal_lm): unknown key(s) 'pretrainde' (did you mean 'pretrained'?)"),
    ("train_loader.data_dirr=x", "train_loader (domain_mixture): unknown key(s) 'data_dirr' (did you mean 'data_dir'?)"),
    ("eval_loader.splt=eval", "domain_eval: unknown key(s) ['splt']"),
    ("callbacks.hf_checkpointer.save_folder=hf", "callbacks.hf_checkpointer in a pruning run would save the "
     "unpruned source model"),
    ("fsdp_config.activation_checkpointing=true", "needs fsdp_config.activation_checkpointing_reentrant: false"),
])
def test_a_misspelt_or_refused_key_is_one_line_naming_it(own, tiny_assets, tmp_path, typo, message):
    result = _train([*_short_run(tiny_assets, own["data"], tmp_path / "run"), typo])
    assert result.returncode == 2
    assert message in _one_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


def test_hf_checkpointer_is_refused_in_pruning_runs_only():
    from drpruning.config_checks import check_drpruning_blocks

    pruning = {"model": {"name": "drpruning_causal_lm", "l0_module": {"target": {}}},
               "callbacks": {"pruning": {}, "hf_checkpointer": {"save_folder": "x"}}}  # fmt: skip
    with pytest.raises(ConfigError, match="hf_checkpointer in a pruning run .* scripts/prune_to_dense.py"):
        check_drpruning_blocks(pruning)
    continued = {"model": {"name": "drpruning_causal_lm"}, "callbacks": {"hf_checkpointer": {"save_folder": "x"}}}
    assert check_drpruning_blocks(continued) is continued


@pytest.mark.parametrize("fsdp_version,fsdp,refused", [
    ("1", {"activation_checkpointing": True}, True),  # FSDP1 defaults to reentrant checkpointing
    ("1", {"activation_checkpointing": True, "activation_checkpointing_reentrant": True}, True),
    ("1", {"activation_checkpointing": True, "activation_checkpointing_reentrant": False}, False),
    ("1", {"activation_checkpointing": False}, False),
    ("2", {"activation_checkpointing": True}, False),  # FSDP2 never re-enters
    ("1", {"use_orig_params": False}, "use_orig_params: false"),
    ("2", {"use_orig_params": False}, False),
])
def test_fsdp1_settings_a_pruning_run_cannot_train_under_are_refused(monkeypatch, fsdp_version, fsdp, refused):
    from drpruning.config_checks import check_drpruning_blocks

    monkeypatch.setenv("FSDP_VERSION", fsdp_version)
    cfg = {"model": {"name": "drpruning_causal_lm", "l0_module": {"target": {}}}, "fsdp_config": fsdp}
    if refused:
        message = refused if isinstance(refused, str) else "activation_checkpointing_reentrant: false"
        with pytest.raises(ConfigError, match=message):
            check_drpruning_blocks(cfg)
    else:
        assert check_drpruning_blocks(cfg) is cfg
    continued = {"model": {"name": "drpruning_causal_lm"}, "fsdp_config": fsdp}
    assert check_drpruning_blocks(continued) is continued, "continued pretraining has no masks to lose"


def test_paper_recipes_pass_the_fsdp_checks_under_both_versions(monkeypatch):
    from omegaconf import OmegaConf

    from drpruning.config_checks import check_fsdp_for_pruning

    recipes = sorted((Path(__file__).resolve().parents[1] / "yamls").glob("prune_*.yaml"))
    assert len(recipes) >= 3
    for version in ("1", "2"):
        monkeypatch.setenv("FSDP_VERSION", version)
        for recipe in recipes:
            check_fsdp_for_pruning(OmegaConf.to_container(OmegaConf.load(recipe)).get("fsdp_config"))
