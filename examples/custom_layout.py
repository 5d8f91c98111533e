"""A layout of your own: subnetworks on a model whose names no known layout has.

``MyEncoder`` stands for a research model with its own module names (a fused query-key-value
projection ``qkv``, an output projection ``proj``, a feed-forward block ``up``/``down``). Declaring
where its heads and neurons live is all it takes: the gates, importance, the probe that checks the
layout, parameter masks and exact masked updates then work as for any detected family. The same
declaration goes into a config as ``model.layout`` for ``python -m subnets.train``.

    python examples/custom_layout.py
"""

import torch
from torch import nn

from subnets import MaskedOptimizer, UnitGates, select_keep_ratio, unit_importance, unit_parameter_masks
from subnets.models.layouts import AttentionLayout, FeedForwardLayout, ModelLayout


class MyEncoder(nn.Module):
    """Two blocks of 2 heads of width 4 and 16 feed-forward neurons on 8-dimensional input."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_attention_heads": 2, "num_hidden_layers": 2})()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "qkv": nn.Linear(8, 24),
                    "proj": nn.Linear(8, 8),
                    "up": nn.Linear(8, 16),
                    "down": nn.Linear(16, 8),
                }
            )  # fmt: skip
            for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:
            q, k, v = block["qkv"](x).unflatten(-1, (3, 2, 4)).unbind(-3)  # [B, T, heads, 4]: blocked q, k, v
            weights = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k), dim=-1)
            x = x + block["proj"](torch.einsum("bhts,bshd->bthd", weights, v).flatten(-2))
            x = x + block["down"](torch.relu(block["up"](x)))
        return x


LAYOUT = ModelLayout(
    attention=AttentionLayout(layers="blocks", output="proj", qkv="qkv"),  # qkv_layout: blocked (the default)
    feed_forward=FeedForwardLayout(layers="blocks", inputs=["up"], output="down"),
)


def main() -> None:
    torch.manual_seed(0)
    model = MyEncoder()
    x = torch.randn(4, 6, 8)
    target = torch.randn(4, 6, 8)
    gates = UnitGates(model, "both", LAYOUT, check=lambda m: m(x))  # the probe runs the model on x
    print(f"units per layer: {gates.units}; the probe found the layout right")

    def loss_fn(batch):
        return ((model(batch) - target) ** 2).mean()

    scores = unit_importance(model, [x], loss_fn, gates=gates)  # |dL/dgate|, normalised per kind
    mask = select_keep_ratio(scores, 0.5)
    print("kept units (heads first, then neurons):\n", mask.int())
    update_mask = unit_parameter_masks(model, mask, gates)
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model.named_parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(5):
        optimizer.zero_grad()
        loss_fn(x).backward()
        optimizer.step(update_mask=update_mask)
    named = dict(model.named_parameters())
    frozen = sum(int((~m).sum()) for m in update_mask.values())
    unchanged = all(torch.equal(named[n].detach()[~m], before[n][~m]) for n, m in update_mask.items())
    print(f"{frozen} coordinates outside the subnetwork, all unchanged after 5 AdamW steps: {unchanged}")
    assert unchanged


if __name__ == "__main__":
    main()
