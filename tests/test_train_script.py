"""scripts/train.py: command-line mappings keyed by domain replace the recipe's, so own data fits a recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf as om

from drpruning.data.mixer import DomainMixtureDataset
from drpruning.data.prepare import prepare_data
from drpruning.demo.tiny import make_tiny_corpus, make_tiny_tokenizer
from drpruning.errors import ConfigError
from drpruning.scheduling.scheduler import DataScheduler

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny" / "prune_llama_gqa.yaml")
PAPER = str(REPO / "yamls" / "prune_1.3b.yaml")


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two domains that no shipped recipe names."""
    root = tmp_path_factory.mktemp("own")
    make_tiny_tokenizer(root / "tokenizer")
    corpus = make_tiny_corpus(root / "corpus", n_domains=2, docs_per_domain=60)
    prepare_data({"news": str(corpus["prose"]), "snippets": str(corpus["code"])}, root / "tokenizer", root / "mds",
                 seq_len=64, eval_sequences=2, show_progress=False)  # fmt: skip
    return root / "mds"


def test_domain_keyed_mappings_on_the_command_line_replace_the_recipes(own_data):
    overrides = [f"variables.data={own_data}", "train_loader.proportions={news: 0.7, snippets: 0.3}",
                 "callbacks.data_scheduler.reference_losses={news: 2.0, snippets: 1.0}",
                 "model.l0_module.target={n_layers: 2}"]  # fmt: skip
    for recipe in (TINY, PAPER):
        cfg = om.to_container(_train_script().load_config(recipe, overrides), resolve=True)
        assert cfg["train_loader"]["proportions"] == {"news": 0.7, "snippets": 0.3}
        assert cfg["callbacks"]["data_scheduler"]["reference_losses"] == {"news": 2.0, "snippets": 1.0}
        assert cfg["train_loader"]["data_dir"] == str(own_data)
        # other mappings still merge as OmegaConf does
        assert cfg["model"]["l0_module"]["target"]["n_layers"] == 2 and len(cfg["model"]["l0_module"]["target"]) == 5
        dataset = DomainMixtureDataset(own_data, global_batch_size=8, proportions=cfg["train_loader"]["proportions"])
        assert dataset.initial_proportions.tolist() == [0.7, 0.3]
    scheduler = DataScheduler(**{k: v for k, v in cfg["callbacks"]["data_scheduler"].items()})
    assert scheduler.reference_losses_config == {"news": 2.0, "snippets": 1.0}
    # A plain merge (what llmfoundry's train_from_yaml does) adds the recipe's domains to yours.
    merged = om.to_container(om.merge(om.load(PAPER), om.from_cli(overrides)), resolve=True)
    with pytest.raises(ConfigError, match="proportions names unknown domain"):
        DomainMixtureDataset(own_data, global_batch_size=8, proportions=merged["train_loader"]["proportions"])


def test_strings_and_null_still_replace_a_mapping():
    cfg = _train_script().load_config(PAPER, ["callbacks.data_scheduler.reference_losses=source",
                                              "train_loader.proportions=null"])  # fmt: skip
    assert cfg.callbacks.data_scheduler.reference_losses == "source"
    assert cfg.train_loader.proportions is None
