"""Export contract: the dense HF model computes the masked model's logits (deterministic masks, fp32, 1e-4)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpruning.demo.tiny import make_tiny_tokenizer, tiny_model
from drpruning.errors import ExportError
from drpruning.export.convert import export_run, main
from drpruning.export.dense import prune_to_dense, pruning_summary
from drpruning.pruning.callback import PruningCallback
from drpruning.pruning.model import DRPruningCausalLM
from drpruning.pruning.prunable import MaskState, make_prunable
from drpruning.pruning.shapes import PRUNING_MODULES, ModelShape
from drpruning.safe_load import load_torch_file

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4
MODELS = {
    "llama_mha": ("llama_mha", {}),
    "llama_gqa": ("llama_gqa", {}),
    "llama_gqa_tied_biases": ("llama_gqa", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen2_tied": ("qwen2", {}),
    "qwen2_untied": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {}),
    "qwen3_tied": ("qwen3", {}),
    "qwen3_biases_untied": ("qwen3", {"attention_bias": True, "tie_word_embeddings": False}),
}
SUBSETS = [s for n in range(1, 5) for s in itertools.combinations(PRUNING_MODULES, n)]
KEEP = {"layer": 3, "intermediate": 80, "hidden": 40}


# Every subset of pruning modules runs on these; the other models run with all four modules.
SUBSET_MODELS = ("llama_mha", "llama_gqa_tied_biases", "qwen2_tied")
MATRIX = [(m, s) for m in SUBSET_MODELS for s in SUBSETS] + [
    (m, PRUNING_MODULES) for m in MODELS if m not in SUBSET_MODELS
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source_models() -> dict[str, torch.nn.Module]:
    return {name: tiny_model(kind, **overrides) for name, (kind, overrides) in MODELS.items()}


@pytest.fixture(scope="module")
def masked_models(source_models) -> dict[str, tuple[torch.nn.Module, MaskState]]:
    """A prunable copy of each source model (the export reads the untouched original)."""
    copies = {}
    for name, model in source_models.items():
        masked = copy.deepcopy(model)
        copies[name] = (masked, make_prunable(masked, ModelShape.from_hf_config(masked.config)))
    return copies


def random_masks(shape: ModelShape, modules, soft: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform top-k style masks; kept values are 1, or random in (0.5, 1.5) when `soft`."""
    g = torch.Generator().manual_seed(seed)
    keep = {**KEEP, "head": max(1, shape.n_kv_heads // 2)}
    sizes = {"layer": (1, shape.n_layers), "head": (shape.n_layers, shape.n_kv_heads),
             "intermediate": (shape.n_layers, shape.intermediate_size), "hidden": (1, shape.hidden_size)}  # fmt: skip
    masks = {}
    for name in modules:
        rows, units = sizes[name]
        mask = torch.zeros(rows, units)
        for row in range(rows):
            kept = torch.randperm(units, generator=g)[: keep[name]]
            mask[row, kept] = torch.rand(keep[name], generator=g) + 0.5 if soft else 1.0
        masks[name] = mask[0] if name in ("layer", "hidden") else mask
    return masks


def masked_logits(model, masks, ids) -> torch.Tensor:
    masked = copy.deepcopy(model)
    make_prunable(masked, ModelShape.from_hf_config(masked.config)).set(masks)
    with torch.no_grad():
        return masked(ids).logits


def cached_masked_logits(masked_models, name: str, masks, ids) -> torch.Tensor:
    masked, state = masked_models[name]
    state.set(masks)
    try:
        with torch.no_grad():
            return masked(ids).logits
    finally:
        state.clear()


def token_ids(vocab: int = 512, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("soft", [False, True], ids=["ones", "soft"])
@pytest.mark.parametrize("model_name,modules", MATRIX, ids=[f"{m}-{'+'.join(s)}" for m, s in MATRIX])
def test_export_equals_masked_forward(source_models, masked_models, model_name, modules, soft):
    model = source_models[model_name]
    shape = ModelShape.from_hf_config(model.config)
    masks = random_masks(shape, modules, soft)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = prune_to_dense(model, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the source must not change"

    ids = token_ids()
    with torch.no_grad():
        diff = (cached_masked_logits(masked_models, model_name, masks, ids) - dense(ids).logits).abs().max()
    assert diff <= ATOL, f"dense export differs from the masked forward by {diff}"

    kv_heads = max(1, shape.n_kv_heads // 2) if "head" in modules else shape.n_kv_heads
    expected = ModelShape(
        n_layers=KEEP["layer"] if "layer" in modules else shape.n_layers,
        hidden_size=KEEP["hidden"] if "hidden" in modules else shape.hidden_size,
        n_heads=kv_heads * shape.heads_per_group, n_kv_heads=kv_heads, head_dim=shape.head_dim,
        intermediate_size=KEEP["intermediate"] if "intermediate" in modules else shape.intermediate_size,
        vocab_size=shape.vocab_size, tie_embeddings=shape.tie_embeddings and not (soft and "hidden" in modules),
        qkv_bias=shape.qkv_bias, o_bias=shape.o_bias, mlp_bias=shape.mlp_bias, head_norms=shape.head_norms,
    )  # fmt: skip
    assert ModelShape.from_hf_config(dense.config) == expected
    assert sum(p.numel() for p in dense.parameters()) == expected.num_params()
    assert dense.config.head_dim == shape.head_dim


def test_tied_embeddings_stay_tied_unless_hidden_values_differ_from_one(source_models):
    model = source_models["qwen2_tied"]
    shape = ModelShape.from_hf_config(model.config)
    soft_heads = random_masks(shape, ("head", "intermediate"), soft=True) | random_masks(shape, ("hidden",), False)
    dense = prune_to_dense(model, soft_heads)
    assert dense.config.tie_word_embeddings
    assert dense.lm_head.weight is dense.get_input_embeddings().weight
    untied = prune_to_dense(model, random_masks(shape, ("hidden",), soft=True))
    assert not untied.config.tie_word_embeddings
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_saved_export_loads_as_stock_model_and_generates(source_models, tmp_path):
    model = source_models["qwen2_tied"]
    shape = ModelShape.from_hf_config(model.config)
    masks = random_masks(shape, PRUNING_MODULES, soft=True)
    prune_to_dense(model, masks).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"], config["tie_word_embeddings"]) == (1, 16, False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids = token_ids()
    with torch.no_grad():
        assert (loaded(ids).logits - masked_logits(model, masks, ids)).abs().max() <= ATOL
    generated = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


def test_uneven_masks_name_module_and_counts(source_models):
    model = source_models["llama_mha"]
    shape = ModelShape.from_hf_config(model.config)
    masks = random_masks(shape, ("head", "layer"), soft=False)
    masks["head"][0] = 1.0  # layer 0 keeps all 8 heads, the others 4
    masks["layer"][:] = 1.0
    with pytest.raises(ExportError, match=r"head mask keeps \{0: 8, 1: 4"):
        prune_to_dense(model, masks)
    masks["layer"][0] = 0.0  # a pruned layer's head row does not matter
    prune_to_dense(model, masks)
    with pytest.raises(ExportError, match="intermediate mask has shape"):
        prune_to_dense(model, {"intermediate": torch.ones(4, 7)})
    with pytest.raises(ExportError, match="keep 0 layers"):
        prune_to_dense(model, {"layer": torch.zeros(4)})


def test_summary_lists_kept_units(source_models):
    model = source_models["llama_gqa"]
    shape = ModelShape.from_hf_config(model.config)
    masks = random_masks(shape, PRUNING_MODULES, soft=False)
    summary = pruning_summary(model, masks, prune_to_dense(model, masks), source="src", step=7)
    kept_layers = masks["layer"].nonzero().flatten().tolist()
    assert [entry["source_layer"] for entry in summary["kept"]["layers"]] == kept_layers
    assert summary["kept"]["layers"][0]["kv_heads"] == masks["head"][kept_layers[0]].nonzero().flatten().tolist()
    assert summary["kept"]["hidden"] == masks["hidden"].nonzero().flatten().tolist()
    assert summary["params_after"] < summary["params_before"] == shape.num_params()
    assert json.loads(json.dumps(summary)) == summary


# ---- a real tiny pruning run -------------------------------------------------------------------------------

TARGET = {"n_layers": 3, "hidden_size": 48, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 96}


def frozen_pruning_optimizer(model: DRPruningCausalLM) -> torch.optim.Optimizer:
    """The param groups the `pruning` callback requires (ascent on λ), with steps too small to move anything."""
    named = dict(model.named_parameters())
    lambdas = [p for n, p in named.items() if "l0_module.lambda_" in n]
    gates = [p for n, p in named.items() if "l0_module.gates." in n]
    rest = [p for n, p in named.items() if "l0_module." not in n]
    return torch.optim.SGD([{"params": rest}, {"params": lambdas, "lr": -1e-30}, {"params": gates, "lr": 1e-30}],
                           lr=0.0)


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory):
    """A one-batch Composer pruning run on CPU with random gates; returns (run dir, trained Composer model)."""
    root = tmp_path_factory.mktemp("run")
    source = root / "source"
    tokenizer = make_tiny_tokenizer(source, vocab_size=300)
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(source)
    model = DRPruningCausalLM(
        tokenizer=tokenizer, pretrained_model_name_or_path=str(source),
        l0_module={"pruning_modules": list(PRUNING_MODULES), "target": TARGET},
    )  # fmt: skip
    with torch.no_grad():
        for gates in model.l0_module.gates.values():
            gates.copy_(torch.randn(gates.shape, generator=torch.Generator().manual_seed(5)) * 3)
    ids = token_ids(vocab=len(tokenizer), batch=4, length=16)
    loader = torch.utils.data.DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)
    trainer = Trainer(
        model=model, train_dataloader=loader, max_duration="1ba", optimizers=frozen_pruning_optimizer(model),
        save_folder=str(root / "run"), save_interval="1ba", device="cpu", progress_bar=False,
        callbacks=[PruningCallback()],
    )  # fmt: skip
    trainer.fit()
    trainer.close()
    return root / "run", model.eval()


def composer_logits(model: DRPruningCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The masked model scored at the target shape (the run itself evaluated its current size)."""
    model.l0_module.eval_masks = "target"
    try:
        with torch.no_grad():
            return model({"input_ids": ids}).logits
    finally:
        model.l0_module.eval_masks = "current"


@pytest.mark.slow  # starts a process
def test_script_exports_a_real_checkpoint(pruning_run, tmp_path):
    run, composer_model = pruning_run
    out = tmp_path / "dense"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prune_to_dense.py"), str(run), str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = token_ids(vocab=dense.config.vocab_size)
    with torch.no_grad():
        assert (dense(ids).logits - composer_logits(composer_model, ids)).abs().max() <= ATOL
    assert ModelShape.from_hf_config(dense.config).target_dict() == TARGET
    summary = json.loads((out / "pruning.json").read_text())
    assert summary["step"] == 1 and summary["target_shape"] == TARGET
    assert summary["verification"]["max_abs_logit_diff"] <= ATOL
    gates = composer_model.l0_module.gates["hidden"].detach()
    assert summary["kept"]["hidden"] == sorted(gates.argsort(descending=True)[: TARGET["hidden_size"]].tolist())
    current, target = composer_model.l0_module.current_masks(), composer_model.l0_module.target_masks()
    for module, agreement in summary["shared_with_current_masks"].items():
        both = float(((current[module] > 0) & (target[module] > 0)).sum() / (target[module] > 0).sum())
        assert agreement["shared"] == pytest.approx(both) and 0.0 < both <= 1.0
        assert agreement["current_units"] == int(current[module].sum())
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The quick fox", return_tensors="pt").input_ids
    assert dense.generate(prompt, max_new_tokens=3, do_sample=False).shape[1] == prompt.shape[1] + 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder may be left"


@pytest.mark.slow  # starts a process
def test_export_refuses_a_tokenizer_that_does_not_fit(pruning_run, tmp_path):
    run, composer_model = pruning_run
    vocab = composer_model.model.config.vocab_size
    big = tmp_path / "big-tokenizer"
    tokens = len(make_tiny_tokenizer(big, vocab_size=2000))  # as many as the tiny corpus yields: over 1,000
    with pytest.raises(ExportError, match=rf"big-tokenizer has {tokens:,} tokens but the model has {vocab:,} embedding rows"):
        export_run(run, tmp_path / "out", verify=False, tokenizer=big)
    other = tmp_path / "other-tokenizer"  # fits the embedding, but is not the run's vocabulary
    make_tiny_tokenizer(other, vocab_size=vocab - 20)
    with pytest.raises(ExportError, match="other-tokenizer differs from the one saved in the checkpoint"):
        export_run(run, tmp_path / "out", verify=False, tokenizer=other)
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prune_to_dense.py"), str(run), str(tmp_path / "o"),
                             "--tokenizer", str(big)], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and f"{tokens:,} tokens" in result.stderr


def _checkpoint_state(run: Path) -> dict:
    return load_torch_file(run / "latest-rank0.pt", "a Composer checkpoint")


def test_meta_json_fallback_embedded_tokenizer_and_overwrite(pruning_run, tmp_path):
    run, composer_model = pruning_run
    checkpoint = _checkpoint_state(run)
    description = checkpoint["state"]["callbacks"].pop("PruningCallback")
    description["source"] = str(tmp_path / "moved-away")  # the tokenizer must come from the checkpoint then
    other_run = tmp_path / "other-run"
    (other_run / "masks").mkdir(parents=True)
    (other_run / "masks" / "meta.json").write_text(json.dumps(description))
    torch.save(checkpoint, other_run / "ep0-ba1-rank0.pt")
    out = tmp_path / "dense"
    export_run(run, out, verify=False)
    assert json.loads((out / "pruning.json").read_text())["tokenizer"] == "checkpoint"  # the run's own, by default
    with pytest.raises(ExportError, match="not empty"):
        export_run(other_run, out)
    export_run(other_run, out, overwrite=True)  # a previous export is replaced as a whole
    assert json.loads((out / "pruning.json").read_text())["tokenizer"] == "checkpoint"
    ids = token_ids(vocab=composer_model.model.config.vocab_size)
    dense = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (dense(ids).logits - composer_logits(composer_model, ids)).abs().max() <= ATOL


def test_sharded_checkpoint_directory(pruning_run, tmp_path):
    import torch.distributed.checkpoint as dcp

    run, composer_model = pruning_run
    state = _checkpoint_state(run)["state"]
    sharded = tmp_path / "run" / "ep0-ba1"
    dcp.save({"state": {k: state[k] for k in ("model", "callbacks", "timestamp", "integrations")}},
             checkpoint_id=str(sharded))  # fmt: skip
    out = export_run(tmp_path / "run", tmp_path / "dense")
    ids = token_ids(vocab=composer_model.model.config.vocab_size)
    with torch.no_grad():
        diff = (AutoModelForCausalLM.from_pretrained(out)(ids).logits - composer_logits(composer_model, ids)).abs()
    assert diff.max() <= ATOL


def test_bad_inputs_fail_with_clear_messages(pruning_run, tmp_path, capsys):
    run, _ = pruning_run
    checkpoint = _checkpoint_state(run)
    model_state = checkpoint["state"]["model"]
    for key in [k for k in model_state if k.startswith("l0_module.")]:
        del model_state[key]
    no_masks = tmp_path / "no-masks.pt"
    torch.save(checkpoint, no_masks)
    with pytest.raises(ExportError, match="without pruning masks.*[Cc]ontinued-pretraining"):
        export_run(no_masks, tmp_path / "a")

    foreign = tmp_path / "notes.pt"
    foreign.write_text("these are not weights")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "latest-rank0.pt").read_bytes()[:5000])
    for bad in (foreign, truncated):
        assert main([str(bad), str(tmp_path / "b")]) == 2
        assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    with pytest.raises(ExportError, match="holds no Composer checkpoint"):
        export_run(empty_run, tmp_path / "c")


def test_failed_verification_leaves_nothing(pruning_run, tmp_path, monkeypatch):
    import drpruning.export.dense as export

    def corrupted(model, masks, kept=None):
        dense = prune_to_dense(model, masks, kept)
        with torch.no_grad():
            dense.get_decoder().norm.weight.mul_(1.01)
        return dense

    monkeypatch.setattr(export, "prune_to_dense", corrupted)
    run, _ = pruning_run
    with pytest.raises(ExportError, match="verification failed"):
        export_run(run, tmp_path / "dense")
    assert list(tmp_path.iterdir()) == []


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_touches_the_run_or_files_an_export_did_not_write(pruning_run, tmp_path, capsys):
    run, _ = pruning_run
    before = _tree(run.parent)
    for source, out, message in ((run, run, "is the input"), (run, run.parent, "contains the input"),
                                 (run, run / "dense", "lies inside the input"),
                                 (run / "latest-rank0.pt", run, "contains the input")):  # fmt: skip
        assert main([str(source), str(out), "--overwrite", "--no-verify"]) == 2
        assert message in capsys.readouterr().err
    assert _tree(run.parent) == before, "the run folder and its siblings are unchanged"

    out = tmp_path / "models"
    (out / "sub").mkdir(parents=True)
    (out / "NOTES.md").write_text("notes")
    (out / "sub" / "other_model.safetensors").write_bytes(b"weights")
    with pytest.raises(ExportError, match="not a previous export"):
        export_run(run, out, overwrite=True, verify=False)
    (out / "pruning.json").write_text("{}")  # looks like an export, but holds other files too
    with pytest.raises(ExportError, match=r"holds files an export does not write \(NOTES.md, sub/\)"):
        export_run(run, out, overwrite=True, verify=False)
    assert (out / "NOTES.md").read_text() == "notes"
    assert (out / "sub" / "other_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"], "no staging folder is left"
