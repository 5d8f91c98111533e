"""The library from Python, as a notebook uses it: a run, its results, the trained run reused,
and the parts (gates, importance, masks, the masked optimizer) on a Hugging Face model.

    python examples/notebook_api.py            # about a minute on 2 CPU cores; writes runs/
"""

import torch

from subnets import (
    HeadGates,
    MaskedOptimizer,
    compose_config,
    load_run,
    run,
    select_keep_ratio,
    unit_importance,
    unit_parameter_masks,
)
from subnets.models.encoder import build_tiny_transformer


def main() -> None:
    # 1. A run, composed exactly as the command line composes it (debug=tiny: seconds).
    cfg = compose_config(["debug=tiny", "+method=dynamic", "dynamic.update_every=4"])
    results = run(cfg, "runs/notebook")
    print(
        "mean target LAS:",
        round(results["target_mean"]["las"], 2),
        "| few-shot:",
        round(results["fewshot"]["mean"]["las"], 2),
    )

    # 2. The trained run, reused: parse sentences with a language's subnetwork.
    trained = load_run("runs/notebook")
    parsed = trained.parse([["wino", "lue", "qexy"]], language="syn_svo")
    print("heads:", parsed[0].heads, "relations:", parsed[0].deprels)

    # 3. The parts on a Hugging Face transformer of your own (here a tiny random BERT).
    transformer = build_tiny_transformer(
        vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )
    gates = HeadGates(transformer)
    inputs = {
        "input_ids": torch.randint(5, 100, (8, 12)),
        "attention_mask": torch.ones(8, 12, dtype=torch.long),
    }

    def loss_fn(batch):  # any loss: here the mean square of the last hidden layer
        return transformer(**batch).last_hidden_state.pow(2).mean()

    scores = unit_importance(transformer, [inputs], loss_fn, gates=gates)  # [layers, heads]
    mask = select_keep_ratio(scores, 0.5)
    optimizer = MaskedOptimizer(
        torch.optim.AdamW(transformer.parameters(), lr=1e-3), transformer.named_parameters()
    )
    loss_fn(inputs).backward()
    optimizer.step(update_mask=unit_parameter_masks(transformer, mask, gates))  # only the kept heads move
    print("kept heads per layer:", mask.sum(dim=1).tolist())


if __name__ == "__main__":
    main()
