"""Per-input (dynamic) execution: a network that computes only the channels each input keeps.

The gated layers (``prunegym.compression.gated_layers``) have their channels in importance order
(``reorder_channels``), so keeping ``k`` of them means keeping the first ``k``: the conv computes
``weight[:k]`` and every layer that reads them uses ``weight[:, :k]``, both contiguous slices cut
once, ahead of time. Channels tied to a residual add stay dense. Who chooses each gated layer's
action is a *decider*, called with the features that enter the layer: a policy, the gate
baseline, or fixed actions (``prunegym.compression.deciders`` holds the observation and the fast
single-input deciders).

Execution runs in one of three ways:

- ``slice`` (eval mode): computes only the kept channels. A batch whose inputs chose differently
  runs each layer in groups of inputs that chose alike, each at its own widths (a conv called once
  per group); the channels an input did not keep are zeros in the layer's output.
- ``loop``: a mixed batch run one input at a time through the slice path.
- ``mask`` (train mode): every channel is computed and the consumers' inputs are multiplied by
  the keep mask, which may carry gradients (the gate baseline trains through it).

All three give the same outputs (a test checks them against each other).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .channels import ChannelGraph, reorder_channels
from .dynamic_layer import DynamicLayer, compute_layer
from .dynamic_plan import Decider, Plan, decide_one
from .gated_layers import DynamicSpec, dynamic_spec
from .importance import Importance, L1Importance

__all__ = ["DynamicNetwork", "build_dynamic", "EXECUTION_MODES", "evaluate_dynamic"]

EXECUTION_MODES = ("slice", "loop", "mask")
def _add_into(a: torch.Tensor, b: Any) -> torch.Tensor:
    """``a + b``, written into ``a`` (a tensor nothing else reads) when that gives the same result."""
    if isinstance(b, torch.Tensor) and b.shape == a.shape and b.dtype == a.dtype:
        return a.add_(b)
    return a + b


def _attach_children(module: nn.Module) -> None:
    """Make each submodule of ``module`` (and theirs) a plain attribute as well, so the traced
    code's ``self.layer1[0].conv1`` lookups skip ``nn.Module.__getattr__``: at batch 1 its ~90
    calls per pass cost some 40 us. ``nn.Module.__setattr__`` drops the plain attribute when a
    submodule is replaced, so the registered one stays the truth."""
    for m in module.modules():
        for name, child in m._modules.items():
            if child is not None:
                m.__dict__[name] = child


class DynamicNetwork(nn.Module):
    """A network that computes, for each input, only the channels its decider keeps.

    ``model`` must already list each gated layer's channels by importance (``build_dynamic`` does
    that) and be traceable by ``torch.fx``. In eval mode it runs the ``slice`` path (weights cut
    once per keep count; ``refresh()`` re-cuts them after the weights change); in train mode the
    ``mask`` path. ``decider(gate, features, spent)`` returns the action for gated layer ``gate``
    from the features entering it and the FLOPs density spent before it: an int (the whole batch),
    a ``[B]`` long tensor, or a ``[B, G]`` 0/1 mask over channel groups that must be a prefix (mask
    mode: it may carry gradients).
    """

    def __init__(self, model: nn.Module, spec: DynamicSpec, decider: nn.Module | Decider | None = None):
        super().__init__()
        self.spec = spec
        self.decider = decider
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as err:  # fx raises many types on code it cannot trace
            raise ValueError(f"dynamic execution needs a torch.fx-traceable model; {type(model).__name__} "
                             f"is not ({err})") from err
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):  # folded BNs are identities: drop their calls
            if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gate_out = {layer.name: g for g, layer in enumerate(spec.layers)}
        gate_in: dict[str, tuple[int, tuple[int, ...]]] = {}
        for g, layer in enumerate(spec.layers):
            for name, channel_of in layer.consumers:
                gate_in[name] = (g, channel_of)
        self._gate_nodes: dict[str, int] = {}
        order: dict[str, int] = {}
        gates_seen = 0
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            name = str(node.target)
            # FLOPs of a layer count as spent from the first decision after it runs: a gated layer's
            # own after its decision, any other layer's from the next gated layer on.
            order.setdefault(name, gates_seen if name in gate_out else gates_seen - 1)
            if name in gate_out:
                self._gate_nodes[name] = gate_out[name]
                gates_seen += 1
            if isinstance(modules.get(name), nn.Conv2d | nn.Linear):
                g_in, channel_of = gate_in.get(name, (-1, None))
                wrapper = DynamicLayer(gm.get_submodule(name), gate_out.get(name, -1), g_in,
                                        None if channel_of is None else torch.tensor(channel_of), self)
                parent, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, wrapper)
        missing = sorted((set(gate_out) | set(gate_in)) - set(order))
        if missing:
            raise ValueError(f"layers {missing} of the spec are not called by {type(model).__name__}")
        gm.recompile()
        _attach_children(gm)
        self.net = gm
        self._called = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
        self._norms = [name for name, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # FLOPs terms in execution order: (gated layers before it, weight, gate in, gate out)
        self._terms = sorted(
            ((order.get(name, len(spec.layers)), flops / spec.dense_flops, g_in, g_out)
             for name, flops, g_in, g_out in spec.costs), key=operator.itemgetter(0))
        self.register_buffer("_counts", torch.tensor([layer.counts for layer in spec.layers]), persistent=False)
        self._fractions = [[count / layer.channels for count in layer.counts] for layer in spec.layers]
        self._plan: Plan | None = None
        self._mode = "slice"
        self.last_actions: list[Any] = []
        self.last_density: Any = None
        self.refresh()

    # ---- helpers the layers call -------------------------------------------------------------------
    def _check_action(self, gate: int, action: Any) -> None:
        layer = self.spec.layers[gate]
        top = len(layer.counts) - 1
        if isinstance(action, int):
            bad = not 0 <= action <= top
        elif isinstance(action, torch.Tensor) and not action.dtype.is_floating_point:
            bad = action.numel() > 0 and bool((action < 0).any() or (action > top).any())
        elif isinstance(action, torch.Tensor):
            bad = action.dim() != 2 or action.shape[1] != len(layer.counts)
        else:
            raise ValueError(f"action for gated layer {layer.name!r} must be an int or a tensor, got {action!r}")
        if bad and isinstance(action, torch.Tensor) and action.dtype.is_floating_point:
            raise ValueError(f"a keep mask for gated layer {layer.name!r} must be [B, {len(layer.counts)}], "
                             f"got {list(action.shape)}")
        if bad:
            shown = action
            if isinstance(action, torch.Tensor):
                shown = int(action[(action < 0) | (action > top)].reshape(-1)[0])
            raise ValueError(f"action {shown} for gated layer {layer.name!r} is outside 0..{top}")

    def _fraction(self, gate: int, action: Any) -> Any:
        layer = self.spec.layers[gate]
        if isinstance(action, int):
            return layer.counts[action] / layer.channels
        if action.dtype.is_floating_point:  # a [B, G] prefix mask over groups
            sizes = torch.diff(self._counts[gate], prepend=self._counts[gate][:1] * 0).to(action.dtype)
            return action @ sizes / layer.channels
        return self._counts[gate][action].to(torch.get_default_dtype()) / layer.channels

    def _resolve(self, plan: Plan, gate: int, mode: str, decide_from: torch.Tensor | None = None):
        """(action index to slice at, per-input keep factors over channels or None)."""
        action = plan.decide(gate, decide_from) if decide_from is not None else plan.actions[gate]
        layer = self.spec.layers[gate]
        if isinstance(action, int):
            if mode == "mask":
                keep = torch.zeros(1, layer.channels)
                keep[:, : layer.counts[action]] = 1.0
                return len(layer.counts) - 1, keep
            return action, None
        if action.dtype.is_floating_point:
            if mode != "mask":
                raise ValueError("a keep mask over channel groups needs mask mode (train mode)")
            group_of = torch.bucketize(torch.arange(layer.channels), self._counts[gate], right=True)
            return len(layer.counts) - 1, action[:, group_of]
        if mode == "mask":
            keep = (torch.arange(layer.channels) < self._counts[gate][action][:, None]).to(torch.get_default_dtype())
            return len(layer.counts) - 1, keep
        top = int(action.max())
        if int(action.min()) == top:
            return top, None
        keep = (torch.arange(layer.counts[top]) < self._counts[gate][action][:, None]).to(torch.get_default_dtype())
        return top, keep

    def _batch1(self) -> Callable[[torch.fx.GraphModule, torch.Tensor, Plan], torch.Tensor]:
        """The slice path for a single input as straight-line code, built once: each gated layer's
        decision is a call (``decide_one``) whose int result the layers that produce and read its
        channels slice their weights at, and a ReLU or residual add whose input only it reads
        writes into that input. At batch 1 an operator costs a few microseconds of dispatch, so the
        general path's per-layer plan lookups (``DynamicLayer.forward``) and extra allocations are
        a measurable share of a pruned network's time. The code looks its layers up in ``self.net``
        on each call, so a submodule replaced later is the one that runs."""
        program = self.__dict__.get("_program")
        if program is not None:
            return program
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        decided: dict[int, torch.fx.Node] = {}
        fresh: set[torch.fx.Node] = set()  # tensors made here that only the next operator reads
        plan = None
        for node in self.net.graph.nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node)
                continue
            if plan is None:
                plan = graph.placeholder("plan")
            layer = self._called.get(node.target) if node.op == "call_module" else None
            owned = bool(node.args) and node.args[0] in fresh and not node.kwargs
            if isinstance(layer, DynamicLayer):
                x = env[node.args[0]]
                if layer.gate_out >= 0:
                    decided[layer.gate_out] = graph.call_function(decide_one, (plan, layer.gate_out, x))
                key = tuple(decided[g] if g >= 0 else 0 for g in (layer.gate_out, layer.gate_in))
                env[node] = graph.call_function(compute_layer, (graph.get_attr(node.target), x, key))
            elif owned and ((node.op == "call_function" and node.target in (torch.relu, F.relu))
                            or (node.op == "call_method" and node.target == "relu")):
                env[node] = graph.call_function(torch.relu_, (env[node.args[0]],))
            elif owned and node.op == "call_function" and node.target in (operator.add, torch.add) \
                    and len(node.args) == 2:
                env[node] = graph.call_function(_add_into, torch.fx.node.map_arg(node.args, env.__getitem__))
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
                continue
            if len(node.users) == 1:
                fresh.add(node)
        code = graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<{type(self).__name__} batch 1>", "exec"), namespace)  # noqa: S102 (fx's own code)
        program = self.__dict__["_program"] = namespace["forward"]
        return program

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_program", None)  # generated code: built again on the first call
        return state

    # ---- public ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-cut the weight slices from the current weights (after training or loading weights)."""
        for layer in self._dynamic_layers().values():
            layer.refresh()

    def _dynamic_layers(self) -> dict[str, DynamicLayer]:
        return {name: m for name, m in self.net.named_modules() if isinstance(m, DynamicLayer)}

    @torch.no_grad()
    def tune(self, example_input: torch.Tensor, repeats: int = 15) -> dict[str, dict[str, str]]:
        """Pick, for each conv and each of its weight slices, the fastest batch-1 kernel on this
        machine: ATen's default (im2col + GEMM at batch 1), NNPACK (Winograd/FFT: fast on wide
        feature maps, slow on small ones) or oneDNN on channels-last tensors (fast on small maps).
        Times each, layout conversions included, on a random input of the slice's shape with the
        current thread count. Returns the choice; ``set_kernels`` applies a saved one."""
        import time

        self._plan = None
        self.net(example_input[:1])  # records every layer's input shape
        choices: dict[str, dict[str, str]] = {}
        for name, layer in self._dynamic_layers().items():
            layer.kernel = {}
            if len(layer.kernels()) == 1 or layer.input_shape is None:
                continue
            for key in layer.keys():
                x = torch.randn((1, layer._slices[key][0].shape[1]) + layer.input_shape[2:])
                times = {}
                for kernel in layer.kernels():
                    layer.kernel = {key: kernel}
                    for _ in range(3):
                        layer.compute(x, key)
                    samples = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        layer.compute(x, key)
                        samples.append(time.perf_counter() - start)
                    times[kernel] = float(np.median(samples))
                best = min(times, key=times.__getitem__)
                if best != "aten" and times[best] < 0.95 * times["aten"]:
                    choices.setdefault(name, {})[f"{key[0]},{key[1]}"] = best
        layer.kernel = {}
        self.set_kernels(choices)
        return choices

    def set_kernels(self, choices: dict[str, dict[str, str]]) -> None:
        """Apply a kernel choice from ``tune``: layer name -> {"a_out,a_in": kernel} (ATen elsewhere)."""
        layers = self._dynamic_layers()
        unknown = sorted(set(choices) - set(layers))
        if unknown:
            raise ValueError(f"kernel choices name layers {unknown} this network does not have")
        for name, layer in layers.items():
            kernel = {}
            for slice_key, choice in choices.get(name, {}).items():
                key = tuple(int(a) for a in slice_key.split(","))
                if key not in layer._slices or choice not in layer.kernels():
                    raise ValueError(f"layer {name!r} cannot run slice {slice_key!r} with kernel {choice!r}; "
                                     f"its kernels are {layer.kernels()}")
                kernel[key] = choice
            layer.kernel = kernel

    def kernels(self) -> dict[str, dict[str, str]]:
        """The current kernel choice, as ``tune`` returns it."""
        return {name: {f"{k[0]},{k[1]}": v for k, v in sorted(layer.kernel.items())}
                for name, layer in self._dynamic_layers().items() if layer.kernel}

    def train(self, mode: bool = True) -> DynamicNetwork:
        super().train(mode)
        if not mode:
            self.refresh()
        return self

    def forward(self, x: torch.Tensor, actions: Sequence[Any] | torch.Tensor | None = None,
                mode: str | None = None) -> torch.Tensor:
        """Logits for ``x``. ``actions`` (one per gated layer: an int, or a ``[B]`` tensor; or a
        ``[B, layers]`` tensor) fixes the decisions; otherwise the decider makes them. ``mode``:
        ``slice``, ``loop`` or ``mask`` (default: ``mask`` in train mode, ``slice`` in eval mode).
        After the call ``last_actions`` and ``last_density`` hold what was decided and its FLOPs density."""
        mode = ("mask" if self.training else "slice") if mode is None else mode
        if mode not in EXECUTION_MODES:
            raise ValueError(f"mode must be one of {EXECUTION_MODES}, got {mode!r}")
        if mode != "mask" and self._norms:
            raise ValueError(f"{mode} mode needs the batch norms folded into the convs ({self._norms[0]!r} is "
                             "not); build with fold_bn=True, or run this network in mask mode")
        if isinstance(actions, torch.Tensor) and actions.dim() == 2:
            actions = list(actions.unbind(1))
        if actions is not None and len(actions) != len(self.spec.layers):
            raise ValueError(f"need one action per gated layer ({len(self.spec.layers)}), got {len(actions)}")
        if mode == "loop" and x.shape[0] > 1:
            outs, decided, density = [], [], []
            for i in range(x.shape[0]):
                row = None if actions is None else [a if isinstance(a, int) else int(a[i]) for a in actions]
                outs.append(self.forward(x[i: i + 1], row, "slice"))
                decided.append(self.last_actions)
                density.append(self.last_density)
            self.last_actions = [torch.tensor([int(d[g]) for d in decided]) for g in range(len(self.spec.layers))]
            self.last_density = torch.tensor(density)
            return torch.cat(outs)
        if mode == "loop":
            mode = "slice"
        plan = Plan(self, actions, self.decider)
        if mode == "slice" and x.shape[0] == 1:
            out = self._batch1()(self.net, x, plan)
        else:
            self._plan, self._mode = plan, mode
            try:
                out = self.net(x)
            finally:
                self._plan = None
        self.last_actions = plan.actions
        self.last_density = plan.density()
        return out

    def steps(self, x: torch.Tensor, mode: str = "slice") -> Iterator[tuple[int, torch.Tensor, Any]]:
        """Run ``x`` one gated layer at a time: yields ``(gate, features entering it, FLOPs density
        spent so far)`` and takes the action for it through ``send``; returns the logits (in
        ``StopIteration.value``), with ``last_actions`` and ``last_density`` set as by ``forward``.
        This is how an environment walks an input through the network."""
        plan = Plan(self, None, None)
        env: dict[torch.fx.Node, Any] = {}
        modules = self._called

        def load(n: torch.fx.Node) -> Any:
            return env[n]

        for node in self.net.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            args = torch.fx.node.map_arg(node.args, load)
            kwargs = torch.fx.node.map_arg(node.kwargs, load)
            if node.op == "output":
                self.last_actions, self.last_density = plan.actions, plan.density()
                return args[0]
            self._plan, self._mode = plan, mode
            if node.op == "call_module" and node.target in self._gate_nodes:
                gate = self._gate_nodes[node.target]
                plan._spend_until(gate)
                features = modules[node.target].masked_input(args[0])[0]
                self._plan = None
                plan.actions[gate] = yield gate, features, plan.spent
                self._plan = plan
            try:
                if node.op == "call_module":
                    env[node] = modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "get_attr":
                    env[node] = operator.attrgetter(node.target)(self.net)
            finally:
                self._plan = None
        raise RuntimeError("the traced graph has no output")  # pragma: no cover


def build_dynamic(model: nn.Module, example_input: torch.Tensor, groups: int = 4,
                  importance: Importance | None = None, fold_bn: bool = True,
                  decider: nn.Module | Decider | None = None) -> tuple[DynamicNetwork, nn.Module, DynamicSpec]:
    """A ``DynamicNetwork`` from a trained model: each gated layer's channels reordered by
    ``importance`` (L1 by default; the function is unchanged), BN folded into the convs unless
    ``fold_bn=False`` (to train it further). Returns the network, the reordered model it runs
    (unfolded) and the spec."""
    from .fusion import fold_batchnorm

    graph = ChannelGraph(model, example_input)
    spec = dynamic_spec(graph, groups)
    reordered = reorder_channels(model, graph, importance or L1Importance(), only={layer.name for layer in spec.layers})
    was_training = model.training
    model.eval()
    reordered.eval()
    with torch.no_grad():
        same = torch.allclose(reordered(example_input), model(example_input), rtol=1e-4, atol=1e-4)
    model.train(was_training)
    reordered.train(was_training)
    if not same:  # e.g. a conv added to the raw input: no dependency graph sees that tie
        raise ValueError(f"reordering the channels of {type(model).__name__} changes its outputs: some gated "
                         "layer's channels are tied to something the dependency graph does not see")
    runnable = fold_batchnorm(reordered) if fold_bn else reordered
    net = DynamicNetwork(runnable, spec, decider)
    net.train(reordered.training and not fold_bn)
    return net, reordered, spec


@torch.no_grad()
def evaluate_dynamic(net: DynamicNetwork, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and the per-input FLOPs density and actions of ``net`` (eval mode)
    on the inputs ``x`` with labels ``y``."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct, loss, densities, actions = 0, 0.0, [], []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = net(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        n = len(yb)
        densities.append(np.broadcast_to(np.asarray(torch.as_tensor(net.last_density).cpu(), dtype=np.float64), (n,)))
        actions.append(np.stack([np.broadcast_to(np.asarray(torch.as_tensor(a).cpu()), (n,))
                                 for a in net.last_actions], axis=1))
    net.train(was_training)
    density = np.concatenate(densities)
    return {"accuracy": correct / len(y), "loss": loss / len(y), "density_mean": float(density.mean()),
            "density_std": float(density.std()), "densities": density, "actions": np.concatenate(actions)}
