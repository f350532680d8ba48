"""Where prepared data meets a model: the tokenizer fingerprint and the sequence length are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from drpruning.data.checks import FINGERPRINT_KEY, tokenizer_fingerprint
from drpruning.data.domain_eval import expand_domain_eval
from drpruning.data.manifest import load_manifest
from drpruning.data.mixer import build_domain_mixture_dataloader
from drpruning.demo.tiny import make_tiny_mds, make_tiny_tokenizer, save_tiny_model
from drpruning.errors import ConfigError
from drpruning.evaluation import main as eval_domains_main

SEQ_LEN = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    data = make_tiny_mds(root, n_domains=2, seq_len=SEQ_LEN, eval_sequences=4, docs_per_domain=40)
    # More ids than the data's 512: the old vocabulary-size check let this tokenizer's runs through.
    make_tiny_tokenizer(root / "other", vocab_size=600)
    return {"root": root, "data": data, "tokenizer": root / "tokenizer", "other": root / "other"}


def _eval_cfg(tokenizer: Path, data: Path, max_seq_len: int = SEQ_LEN) -> dict:
    return {"tokenizer": {"name": str(tokenizer)}, "max_seq_len": max_seq_len,
            "eval_loader": {"name": "domain_eval", "data_dir": str(data)}}  # fmt: skip


def test_the_manifest_records_a_fingerprint_that_survives_save_and_reload(assets, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(assets["tokenizer"]))
    fingerprint = load_manifest(assets["data"])[FINGERPRINT_KEY]
    assert fingerprint == tokenizer_fingerprint(tokenizer) and fingerprint.startswith("sha256:")
    tokenizer.save_pretrained(str(tmp_path / "copy"))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp_path / "copy"))) == fingerprint
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(assets["other"]))) != fingerprint


def test_the_train_loader_refuses_data_of_another_tokenizer(assets):
    right = AutoTokenizer.from_pretrained(str(assets["tokenizer"]))
    assert build_domain_mixture_dataloader(right, 4, str(assets["data"])).dataloader.dataset.domains
    other = AutoTokenizer.from_pretrained(str(assets["other"]))
    with pytest.raises(ConfigError, match=r"domain_mixture: .* was tokenized with another tokenizer .*512 tokens.*"
                                          r"\(600 tokens"):
        build_domain_mixture_dataloader(other, 4, str(assets["data"]))


def test_a_manifest_without_fingerprint_warns_and_still_loads(assets, tmp_path):
    data = tmp_path / "old"
    shutil.copytree(assets["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest[FINGERPRINT_KEY]
    (data / "manifest.json").write_text(json.dumps(manifest))
    other = AutoTokenizer.from_pretrained(str(assets["other"]))
    with pytest.warns(UserWarning, match="predates tokenizer fingerprints"):
        build_domain_mixture_dataloader(other, 4, str(data))


def test_the_eval_loaders_refuse_data_of_another_tokenizer_and_a_shorter_max_seq_len(assets):
    loaders = expand_domain_eval(_eval_cfg(assets["tokenizer"], assets["data"]))["eval_loaders"]
    assert [loader["label"] for loader in loaders] == ["prose", "code"]
    with pytest.raises(ConfigError, match="domain_eval: .* was tokenized with another tokenizer"):
        expand_domain_eval(_eval_cfg(assets["other"], assets["data"]))
    with pytest.raises(ConfigError, match="max_seq_len 16 is shorter than the seq_len 32"):
        expand_domain_eval(_eval_cfg(assets["tokenizer"], assets["data"], max_seq_len=16))


def test_eval_domains_refuses_data_of_another_tokenizer_in_one_line(assets, tmp_path, capsys):
    model = save_tiny_model("qwen2", tmp_path / "model", vocab_size=600)
    AutoTokenizer.from_pretrained(str(assets["other"])).save_pretrained(str(model))
    assert eval_domains_main([str(model), str(assets["data"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"eval_domains: error: {assets['data']} was tokenized with another tokenizer")
    assert len(err.splitlines()) == 1


def test_importance_calibration_refuses_data_of_another_tokenizer(assets):
    from drpruning.pruning.calibration import CalibrationConfig, check_calibration_tokenizer

    config = CalibrationConfig(data_dir=str(assets["data"]))
    check_calibration_tokenizer(config, AutoTokenizer.from_pretrained(str(assets["tokenizer"])))
    with pytest.raises(ConfigError, match="l0_module.calibration: .* was tokenized with another tokenizer"):
        check_calibration_tokenizer(config, AutoTokenizer.from_pretrained(str(assets["other"])))
