"""MAML over tasks (languages) with ``torch.func.functional_call``.

For a task with a support batch ``S`` and a query batch ``Q``, ``n`` inner SGD steps adapt the
parameters::

    theta_0 = theta,    theta_{i+1} = theta_i - alpha_g * m * grad L_S(theta_i)

(``alpha_g`` the inner learning rate of the parameter's group, encoder or task head; ``m`` the
task's update mask, 1 where the task may update), and the meta-loss is the query loss at the
adapted parameters, averaged over the episode's tasks::

    L_meta(theta) = 1/T sum_t L_Q_t(theta_n^t)

Second-order MAML differentiates through the inner steps (``create_graph``), so the
meta-gradient holds the inner Jacobian ``prod_i (I - alpha m H_i)``; first-order MAML drops it
and uses ``grad L_Q(theta_n)`` evaluated at the adapted parameters. With
``learn_inner_lr=True`` the per-group inner learning rates are parameters trained by the outer
step (Meta-SGD with one rate per group).

A task's meta-gradient is masked by its update mask before the tasks are summed, and the outer
step goes through a [MaskedOptimizer][subnets.optim.MaskedOptimizer] with the union of the tasks' masks,
so no coordinate outside every task's subnetwork moves.

Second-order gradients need attention with a double backward: eager attention, or sdpa with
the math kernel, which is selected automatically during second-order computations; other
implementations (flash attention) are refused with a clear error. Each task's graph is
released before the next, so memory does not grow with the number of meta-steps.

Example (any model whose call returns a loss)::

    maml = MAML(model, inner_steps=1, inner_lr={"encoder": 1e-3, "head": 1e-2}, first_order=False,
                group_of=lambda name: "encoder" if name.startswith("encoder.") else "head")
    result = maml.meta_step([MetaTask(support, query), MetaTask(support2, query2)], optimizer)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from subnets.models.gates import gate_probe
from subnets.parallel.distributed import DataParallel
from subnets.training.update import apply_update

Params = dict[str, torch.Tensor]


@dataclass
class MetaTask:
    """One language's episode: support and query batches, and its subnetwork (if any)."""

    support: object
    query: object
    name: str = ""
    gates: torch.Tensor | None = None  # forward unit gates for the inner steps and the query
    update_mask: Mapping[str, torch.Tensor] | None = None  # inner and outer update mask
    track_gates: bool = False  # return dL_query/dgate


@dataclass
class MetaStepResult:
    loss: float  # mean query loss (after adaptation)
    support_loss: float  # mean support loss before adaptation
    grad_norm: float
    words: int
    task_losses: dict[str, float] = field(default_factory=dict)
    gate_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False  # a NaN or infinite query loss or gradient: nothing was updated


def attention_implementations(model: nn.Module) -> set[str]:
    """The ``_attn_implementation`` values of the Hugging Face configs inside ``model``."""
    found = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if implementation:
            found.add(implementation)
    return found


class MAML(nn.Module):
    """First- and second-order MAML on any module (the module docstring states the math).

    Args:
        model: the model; ``loss(run, batch)`` computes a batch's loss with ``run``, the model
            called with given parameters (default: ``run(batch).loss``).
        inner_steps: inner SGD steps per task.
        inner_lr: inner learning rate per group (``{"encoder": ..., "head": ...}``).
        group_of: parameter name -> group name.
        first_order: drop the inner Jacobian.
        learn_inner_lr: make the per-group inner learning rates trainable (Meta-SGD); their
            parameters are ``log_inner_lr``, to be given to the outer optimizer.
        gates: the model's [UnitGates][subnets.models.gates.UnitGates] (default ``model.gates``
            if present) for tasks with unit gates.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 1,
        inner_lr: Mapping[str, float] | float = 1e-3,
        group_of: Callable[[str], str] = lambda name: "default",
        first_order: bool = True,
        learn_inner_lr: bool = False,
        loss: Callable[[Callable, object], torch.Tensor] | None = None,
        gates: Any = None,
        inner_clip_norm: float | None = None,
    ):
        super().__init__()
        self.model = [model]  # a list, so the model is not registered as a submodule twice
        self.inner_steps, self.first_order, self.group_of = inner_steps, first_order, group_of
        self.inner_clip_norm = inner_clip_norm
        rates = inner_lr if isinstance(inner_lr, Mapping) else {"default": inner_lr}
        if any(lr <= 0 for lr in rates.values()):
            raise ValueError(
                f"inner learning rates must be positive (they are learned as logarithms), got {dict(rates)}"
            )
        self.log_inner_lr = nn.ParameterDict(
            {
                g: nn.Parameter(torch.tensor(math.log(lr)), requires_grad=learn_inner_lr)
                for g, lr in rates.items()
            }
        )
        self.fixed_inner_lr = None if learn_inner_lr else dict(rates)  # exact rates when not learned
        self.loss_fn = loss or (lambda run, batch: run(batch).loss)
        self.gates = gates if gates is not None else getattr(model, "gates", None)
        if not first_order:
            implementations = attention_implementations(model) - {"eager", "sdpa"}
            if implementations:
                raise ValueError(
                    f"second-order MAML needs attention with a double backward (eager, or sdpa with the "
                    f"math kernel); the model uses {sorted(implementations)}: set model.attn_implementation=eager "
                    "or meta.first_order=true"
                )

    @property
    def net(self) -> nn.Module:
        return self.model[0]

    def parameters_to_adapt(self) -> Params:
        return {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def inner_lr(self, name: str) -> torch.Tensor | float:
        group = self.group_of(name)
        if group not in self.log_inner_lr:
            raise KeyError(f"no inner learning rate for group {group!r} (parameter {name})")
        if self.fixed_inner_lr is not None:
            return self.fixed_inner_lr[group]
        return self.log_inner_lr[group].exp()

    def _context(self):
        if self.first_order:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])  # the math kernel has a double backward

    def task_loss(self, params: Params, batch, gates: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``batch`` with the model's parameters replaced by ``params``."""

        def run(*args, **kwargs):
            return functional_call(self.net, params, args, kwargs)

        if self.gates is None:
            return self.loss_fn(run, batch)
        with self.gates.applied(gates):
            return self.loss_fn(run, batch)

    def adapt(
        self,
        support,
        params: Params | None = None,
        gates: torch.Tensor | None = None,
        update_mask: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Params, float]:
        """Adapted parameters after the inner steps on ``support`` (differentiable w.r.t. the
        initial ones; through the inner gradients too for second order), and the first support loss."""
        params = dict(params if params is not None else self.parameters_to_adapt())
        names = list(params)
        first_loss = None
        with self._context():
            for _ in range(self.inner_steps):
                loss = self.task_loss(params, support, gates)
                first_loss = float(loss.detach()) if first_loss is None else first_loss
                grads = torch.autograd.grad(
                    loss, [params[n] for n in names], create_graph=not self.first_order, allow_unused=True
                )
                if update_mask is not None:
                    grads = [g * update_mask[n] if g is not None and n in update_mask else g
                             for n, g in zip(names, grads)]  # fmt: skip
                scale = self._clip_factor(grads)
                updated = {}
                for name, grad in zip(names, grads):
                    if grad is None:
                        updated[name] = params[name]
                        continue
                    updated[name] = params[name] - self.inner_lr(name) * scale * grad
                params = updated
        return params, (first_loss if first_loss is not None else float("nan"))

    def _clip_factor(self, grads: Sequence[torch.Tensor | None]) -> float | torch.Tensor:
        """``min(1, inner_clip_norm / ||grads||)`` as ``clip_grad_norm_`` computes it (a constant:
        not differentiated through), or 1 without clipping."""
        if not self.inner_clip_norm or self.inner_clip_norm <= 0:
            return 1.0
        norms = [torch.linalg.vector_norm(g.detach()) for g in grads if g is not None]
        if not norms:
            return 1.0
        total = torch.linalg.vector_norm(torch.stack(norms))
        return (self.inner_clip_norm / (total + 1e-6)).clamp(max=1.0)

    def meta_step(
        self,
        tasks: Sequence[MetaTask],
        optimizer: torch.optim.Optimizer,
        *,
        clip_norm: float | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        parallel: DataParallel | None = None,
    ) -> MetaStepResult:
        """One outer step on an episode of ``tasks`` (the module docstring gives the update).

        With ``parallel`` (data parallelism) each process holds the same tasks' support
        batches and its share of their query batches; each task's query loss is weighted by
        the process's share of that task's query words and the meta-gradients, gate gradients
        and losses are summed over processes, which gives the gradient of the whole episode.
        An episode whose query loss or meta-gradient is not finite updates nothing.
        """
        distributed = parallel is not None and parallel.world_size > 1
        share = [1.0] * len(tasks)  # this process's share of each task's query words
        if distributed:
            local = torch.tensor([float(getattr(t.query, "num_words", 1)) for t in tasks])
            total = local.clone()
            parallel.sum([total])
            share = (local / total).tolist()
        self.net.train()
        optimizer.zero_grad(set_to_none=True)
        initial = self.parameters_to_adapt()
        names = list(initial)
        learned = [p for p in self.log_inner_lr.values() if p.requires_grad]
        result = MetaStepResult(0.0, 0.0, 0.0, 0)
        probes: dict[str, torch.Tensor] = {}
        for task, weight in zip(tasks, share):
            probe = None
            gates = task.gates
            if task.track_gates:
                probe = gate_probe(self.gates.shape, gates, next(self.net.parameters()))
                gates = probe
            adapted, support_loss = self.adapt(task.support, initial, gates, task.update_mask)
            # The task's meta-gradient accumulates into .grad in place, masked on the way by
            # temporary hooks on the initial parameters (no second copy of the gradients).
            hooks = [
                initial[name].register_hook(lambda grad, mask=mask: grad * mask)
                for name, mask in (task.update_mask or {}).items()
                if name in initial
            ]
            try:
                with self._context():
                    query_loss = self.task_loss(adapted, task.query, gates)
                    inputs = [initial[n] for n in names] + learned + ([probe] if probe is not None else [])
                    torch.autograd.backward(query_loss * weight / len(tasks), inputs=inputs)
            finally:
                for hook in hooks:
                    hook.remove()
            if probe is not None:
                probes[task.name] = probe.grad
            result.task_losses[task.name] = float(query_loss.detach()) * weight
            result.loss += float(query_loss.detach()) * weight / len(tasks)
            result.support_loss += support_loss / len(tasks)
            result.words += int(getattr(task.query, "num_words", 0))
            del adapted, query_loss
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if distributed:  # the support losses are the same on every process
            losses = torch.tensor([result.loss, float(result.words), *result.task_losses.values()])
            parallel.sum([p.grad for p in parameters] + list(probes.values()) + [losses])
            result.loss, words, *task_losses = losses.tolist()
            result.words, result.task_losses = int(round(words)), dict(zip(result.task_losses, task_losses))
        result.gate_grads = {name: grad.detach() * len(tasks) for name, grad in probes.items()}
        result.grad_norm, result.skipped = apply_update(
            self.net, optimizer, result.loss, update_mask=_union([t.update_mask for t in tasks]),
            clip_norm=clip_norm, scheduler=scheduler,
        )  # fmt: skip
        if result.skipped:
            result.gate_grads = {}
        return result


def _union(masks: Sequence[Mapping[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Coordinates any task may update (None if some task may update everything)."""
    if not masks or any(m is None for m in masks):
        return None
    union: dict[str, torch.Tensor] = {}
    names = set().union(*(m.keys() for m in masks))
    for name in names:
        if any(name not in m for m in masks):
            continue  # a task that does not mask it updates it freely
        combined = masks[0][name].clone()
        for m in masks[1:]:
            combined |= m[name]
        union[name] = combined
    return union
