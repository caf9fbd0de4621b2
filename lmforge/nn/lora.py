"""Low-rank adapters (LoRA, Hu et al. 2021): `LoRALinear` replaces a model's linears by name.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, K), B: (N_segment, r), scaling = alpha / r
                                                  (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023)

lmforge fuses projections (q|k|v in one `qkv`, gate|up in one `fc_in`), while PEFT's reference
architectures (Llama) keep them apart. So an adapter on a fused linear is a set of *segments*: one
(A, B) pair per role (q, k, v, gate, up, ...) owning a range of the output rows, exactly as PEFT
holds one LoRA per unfused module; a role not targeted has no segment and its rows are untouched.
The layers name their fused rows (`linear_roles()` on Attention / MLP); a linear without roles is
one segment, "all". Interop maps segments to PEFT's names (interop/peft.py).

A `LoRALinear` can hold several named adapters (serving: `--lora NAME=DIR`); which one acts is
set per model (`set_adapter`) or per batch row (`adapter_rows`, the continuous batch mixes them),
and `disabled(model)` turns them all off (DPO / PPO / GRPO's reference: the base without a second
copy of its weights). The base may be a `QuantizedLinear` (QLoRA): it stays frozen and quantised.

Initialisation follows PEFT's default: A Kaiming-uniform (a = sqrt(5)), B zero, so a fresh adapter
leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from lmforge.errors import LMForgeError
from lmforge.nn.linear import Linear, frozen_linear
from lmforge.nn.quant import QuantizedLinear

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
WHOLE = "all"  # the segment name of a linear that is not fused (all its rows)
ALL_LINEAR = "all-linear"
HEADS = ("lm_head",)  # output layers that "all-linear" leaves alone, as PEFT does
DEFAULT_ADAPTER = "default"


@dataclass
class LoRASettings:
    """What one adapter is: rank, scaling, dropout and where it goes (the `lora` config section)."""
    r: int
    alpha: float | None = None  # None: alpha = r (scaling 1)
    dropout: float = 0.0
    targets: str = ALL_LINEAR  # "all-linear" | comma list of roles (q,k,v,o,gate,up,down) or module names
    use_rslora: bool = False
    modules_to_save: str = ""  # comma list of module names trained in full and saved with the adapter

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise LMForgeError(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            raise LMForgeError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LMForgeError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        alpha = float(self.alpha if self.alpha is not None else self.r)
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def save_list(self) -> list[str]:
        return [t.strip() for t in self.modules_to_save.split(",") if t.strip()]


class LoRAAdapter(nn.Module):
    """One adapter of one linear: per segment, `lora_A[seg]` (K -> r) and `lora_B[seg]` (r -> rows)."""

    def __init__(self, in_features: int, segments: dict[str, tuple[int, int]], r: int | dict[str, int],
                 scaling: float | dict[str, float], dropout: float, device: Any = None):
        super().__init__()
        self.segments = dict(segments)
        ranks = r if isinstance(r, dict) else {s: r for s in segments}
        scales = scaling if isinstance(scaling, dict) else {s: scaling for s in segments}
        self.scaling = {s: float(scales[s]) for s in segments}
        self.lora_A = nn.ModuleDict({s: nn.Linear(in_features, ranks[s], bias=False, device=device)
                                     for s in segments})
        self.lora_B = nn.ModuleDict({s: nn.Linear(ranks[s], end - start, bias=False, device=device)
                                     for s, (start, end) in segments.items()})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for s in self.segments:
            nn.init.kaiming_uniform_(self.lora_A[s].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[s].weight)

    def delta(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """scaling * B A x for every segment, zeros on rows no segment owns: (..., out_features)."""
        h = self.dropout(x)
        pieces, at = [], 0
        for s, (start, end) in sorted(self.segments.items(), key=lambda kv: kv[1][0]):
            if start > at:
                pieces.append(x.new_zeros(*x.shape[:-1], start - at))
            A, B = self.lora_A[s], self.lora_B[s]
            pieces.append(B(A(h.to(A.weight.dtype))) * self.scaling[s])
            at = end
        if at < out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], out_features - at))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """The (N, K) update scaling * B @ A this adapter adds to the base weight (zero rows elsewhere)."""
        A0 = next(iter(self.lora_A.values())).weight
        N = max(end for _, end in self.segments.values())
        w = torch.zeros(N, A0.shape[1], dtype=torch.float32, device=A0.device)
        for s, (start, end) in self.segments.items():
            w[start:end] += self.scaling[s] * (self.lora_B[s].weight.float() @ self.lora_A[s].weight.float())
        return w


class LoRALinear(nn.Module):
    """base(x) plus the active adapter's low-rank update. `base` (nn.Linear or QuantizedLinear) is frozen."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: str | None = None      # the adapter every row uses (None: none)
        # per-row adapters (`adapter_rows`): the batch size and, per adapter, the rows it acts on
        # (None: all of them); rows no adapter names get the base alone. None: `active` acts.
        self.row_adapters: tuple[int, list[tuple[str, torch.Tensor | None]]] | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (dtype, device) sees the base's
        return self.base.weight if hasattr(self.base, "weight") else self.base.qweight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(self, name: str, segments: dict[str, tuple[int, int]], r: int | dict[str, int],
                    scaling: float | dict[str, float], dropout: float) -> LoRAAdapter:
        device = self.weight.device if self.weight.device.type != "meta" else None
        self.adapters[name] = LoRAAdapter(self.in_features, segments, r, scaling, dropout, device=device)
        if self.active is None:
            self.active = name
        return self.adapters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is None and self.active is not None and self._fusable(x):
            return _lora_linear(x, self.base, self.adapters[self.active])
        y = self.base(x)
        if self.row_adapters is not None:  # one adapter per batch row (x is (B, ...))
            batch, groups = self.row_adapters
            if x.shape[0] != batch:
                raise ValueError(f"adapter_rows named {batch} rows, the batch has {x.shape[0]}")
            for name, rows in groups:
                if name not in self.adapters:  # this adapter leaves this linear alone
                    continue
                if rows is None:
                    y = y + self.adapters[name].delta(x, self.out_features).to(y.dtype)
                else:
                    delta = self.adapters[name].delta(x.index_select(0, rows), self.out_features)
                    y = y.index_add(0, rows, delta.to(y.dtype))
            return y
        if self.active is None:
            return y
        return y + self.adapters[self.active].delta(x, self.out_features).to(y.dtype)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Training with one adapter on a frozen base: `_LoRALinearFn` computes the same thing in less memory.
        Inference keeps the plain graph (its outputs are what serving and the parity tests compare)."""
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return False
        adapter = self.adapters[self.active]
        if self.training and not isinstance(adapter.dropout, nn.Identity):
            return False  # dropout on the adapters' input: the plain graph keeps its mask
        base = self.base
        if isinstance(base, nn.Linear):
            if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
                return False
            if base.weight.dtype != x.dtype:
                return False
        elif not isinstance(base, QuantizedLinear) or (base.bias is not None and base.bias.requires_grad):
            return False
        return all(m.weight.dtype == x.dtype for m in (*adapter.lora_A.values(), *adapter.lora_B.values()))

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """The fp32 weight base + scaling B A of adapter `name` (default: the active one)."""
        base = self.base.dequantize() if isinstance(self.base, QuantizedLinear) else self.base.weight.float()
        name = name or self.active
        return base + self.adapters[name].delta_weight()[: self.out_features] if name else base

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}"


def _lora_linear(x: torch.Tensor, base: nn.Module, adapter: LoRAAdapter) -> torch.Tensor:
    order = sorted(adapter.segments.items(), key=lambda kv: kv[1][0])
    spans = tuple((start, end, adapter.scaling[s]) for s, (start, end) in order)
    weights = [w for s, _ in order for w in (adapter.lora_A[s].weight, adapter.lora_B[s].weight)]
    dense = isinstance(base, nn.Linear)
    return _LoRALinearFn.apply(x, base.weight if dense else None, base.bias, None if dense else base, spans, *weights)


class _LoRALinearFn(torch.autograd.Function):
    """y = base(x) + sum over segments of scaling * (x A.T) B.T into the segment's rows, for a frozen base.

    The plain graph (`base(x) + delta(x)`) builds the (M, N) update beside the base's output, and in
    backward holds three (M, K) input gradients at once (the base's, the adapter's and their sum: 150 MB
    at GPT-2's MLP width and 8 x 512 tokens). Here the update is added into the base's output in
    place, and dx = dy W + sum scaling (dy_seg B) A is accumulated in one buffer. Saved: x and the
    (M, r) products x A.T; the base's weight is a parameter (dense) or dequantised again (QLoRA).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_NK: torch.Tensor | None, b_N: torch.Tensor | None,
                quantized: nn.Module | None, spans: tuple[tuple[int, int, float], ...],
                *weights: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        x_MK = x.reshape(-1, K)
        if quantized is None:
            y_MN = frozen_linear(x_MK, w_NK, b_N)
        else:
            y_MN = quantized(x_MK)
        if not y_MN.is_contiguous():
            y_MN = y_MN.contiguous()
        h_list = []
        for i, (start, end, scaling) in enumerate(spans):
            A_RK, B_SR = weights[2 * i], weights[2 * i + 1]
            h_MR = x_MK @ A_RK.t()
            y_MN[:, start:end].addmm_(h_MR, B_SR.t(), alpha=scaling)
            h_list.append(h_MR)
        ctx.save_for_backward(x_MK, w_NK, *h_list, *weights)
        ctx.quantized, ctx.spans, ctx.x_shape = quantized, spans, x.shape
        return y_MN.view(*x.shape[:-1], y_MN.shape[-1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x_MK, w_NK, *rest = ctx.saved_tensors
        n = len(ctx.spans)
        h_list, weights = rest[:n], rest[n:]
        g_MN = g.reshape(-1, g.shape[-1])
        need_x = ctx.needs_input_grad[0]
        if need_x:
            if ctx.quantized is None:
                gx_MK = frozen_linear(g_MN, w_NK.t())  # dy @ W
            else:
                gx_MK = ctx.quantized.input_grad(g_MN, x_MK.dtype)
        grads: list[torch.Tensor | None] = []
        for i, (start, end, scaling) in enumerate(ctx.spans):
            A_RK, B_SR = weights[2 * i], weights[2 * i + 1]
            g_MS = g_MN[:, start:end]
            gh_MR = (g_MS @ B_SR).mul_(scaling)  # d loss / d (x A.T)
            grads.append(gh_MR.t() @ x_MK if ctx.needs_input_grad[5 + 2 * i] else None)
            grads.append((g_MS.t() @ h_list[i]).mul_(scaling) if ctx.needs_input_grad[6 + 2 * i] else None)
            if need_x:
                gx_MK.addmm_(gh_MR, A_RK)
        gx = gx_MK.view(ctx.x_shape) if need_x else None
        return (gx, None, None, None, None, *grads)


# ---- whole models ----------------------------------------------------------------------------------

def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{name: LoRA linear} of `model`, without walking into the LoRA linears' own adapters (the
    scheduler asks once per forward pass)."""
    out: dict[str, LoRALinear] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, LoRALinear):
                out[full] = child
            else:
                walk(child, full)

    if isinstance(model, LoRALinear):
        return {"": model}
    walk(model, "")
    return out


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantizedLinear)) and not isinstance(m, LoRALinear)


def linear_roles(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """{linear module name: {segment: (first row, end row)}} for every linear of `model` (LoRA-wrapped
    ones by their own name): roles where the layer declares them (`linear_roles()`), else "all"."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    wrapped = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    for parent_name, parent in model.named_modules():
        if f"{parent_name}.".startswith(wrapped):  # a LoRA linear's own base and A / B linears
            continue
        declared = parent.linear_roles() if hasattr(parent, "linear_roles") else {}
        for child_name, child in parent.named_children():
            lin = child.base if isinstance(child, LoRALinear) else child
            if not _is_linear(lin):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            out[full] = declared.get(child_name) or {WHOLE: (0, lin.out_features)}
    return out


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule: a target names a module by its full name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def segment_name(roles: dict[str, tuple[int, int]], start: int, end: int, out_features: int) -> str:
    """The segment of a linear that rows [start, end) make: the role that owns exactly them, "all" for
    every row, else "rows_START_END"."""
    role = next((r for r, rows in roles.items() if rows == (start, end)), None)
    return role or (WHOLE if (start, end) == (0, out_features) else f"rows_{start}_{end}")


def resolve_targets(model: nn.Module, settings: LoRASettings,
                    aliases: dict[str, list[tuple[str, int, int]]] | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """{linear name: {segment: rows}} the adapter goes on. A target that matches nothing is an error
    that lists what is there.

    `aliases`: {linear name: [(its name elsewhere, first row, end row)]}, the modules the linears are in
    the Hugging Face architecture the model exports to (q_proj, c_attn, ...). A target none of lmforge's
    names match is looked up there by PEFT's rule, so PEFT's `target_modules` work as they are."""
    roles = linear_roles(model)
    saved = settings.save_list()
    targets = settings.target_list()
    if not targets:
        raise LMForgeError("lora.targets is empty; use all-linear or a comma list such as q,k,v,o")
    chosen: dict[str, dict[str, tuple[int, int]]] = {}
    for target in targets:
        hit = False
        for name, segs in roles.items():
            if any(_matches(name, s) for s in saved):
                continue  # trained in full instead
            if target == ALL_LINEAR:  # one pair per linear, fused or not (PEFT's all-linear on GPT-2's c_attn)
                if name.split(".")[-1] in HEADS:
                    continue
                chosen[name] = {WHOLE: (0, max(end for _, end in segs.values()))}
                hit = True
            elif target in segs and target != WHOLE:
                chosen.setdefault(name, {})[target] = segs[target]
                hit = True
            elif _matches(name, target):
                chosen.setdefault(name, {}).update(segs)
                hit = True
        if not hit and aliases:  # PEFT's name for the module in the exported architecture
            for name, parts in aliases.items():
                if name not in roles or any(_matches(name, s) for s in saved):
                    continue
                out_features = max(end for _, end in roles[name].values())
                for other, start, end in parts:
                    if _matches(other, target):
                        chosen.setdefault(name, {})[segment_name(roles[name], start, end, out_features)] = (start, end)
                        hit = True
        if not hit:
            present_roles = sorted({s for segs in roles.values() for s in segs if s != WHOLE},
                                   key=lambda s: ROLES.index(s) if s in ROLES else len(ROLES))
            short = sorted({n.split(".")[-1] for n in roles})
            elsewhere = sorted({other.split(".")[-1] for parts in (aliases or {}).values() for other, _, _ in parts})
            raise LMForgeError(f"lora.targets: '{target}' matches no linear layer of this model; available: "
                               f"{ALL_LINEAR}, roles {','.join(present_roles) or '(none)'}, "
                               f"modules {','.join(short)}"
                               + (f", or as Hugging Face names them {','.join(elsewhere)}" if elsewhere else ""))
    for name, segs in chosen.items():
        spans = sorted(segs.items(), key=lambda kv: kv[1])
        for (s1, (_, end1)), (s2, (start2, _)) in zip(spans, spans[1:]):
            if start2 < end1:
                raise LMForgeError(f"lora.targets: segments '{s1}' and '{s2}' of {name} overlap (rows "
                                   f"{segs[s1][0]}-{end1} and {start2}-{segs[s2][1]}); target one of them")
    return chosen


def add_lora(model: nn.Module, settings: LoRASettings, name: str = DEFAULT_ADAPTER,
             freeze: bool = True, aliases: dict[str, list[tuple[str, int, int]]] | None = None) -> list[str]:
    """Put adapter `name` on the linears `settings.targets` selects (wrapping them in LoRALinear once),
    freeze everything else except `modules_to_save`; returns the adapted module names. `aliases`: as
    `resolve_targets` takes them."""
    chosen = resolve_targets(model, settings, aliases)
    for module_name in settings.save_list():
        if not any(_matches(n, module_name) for n, _ in model.named_modules()):
            names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            raise LMForgeError(f"lora.modules_to_save: '{module_name}' names no module of this model; "
                               f"modules: {', '.join(names)}")
    for full, segs in chosen.items():
        parent_name, _, child_name = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, child_name)
        if not isinstance(child, LoRALinear):
            child = LoRALinear(child)
            setattr(parent, child_name, child)
        child.add_adapter(name, segs, settings.r, settings.scaling, settings.dropout)
    if freeze:
        freeze_base(model, settings.save_list())
    configs = dict(getattr(model, "lora_settings", {}))
    configs[name] = settings
    model.lora_settings = configs
    return sorted(chosen)


def freeze_base(model: nn.Module, modules_to_save: list[str] = ()) -> None:
    """requires_grad only on adapter weights and the modules trained in full."""
    for pname, p in model.named_parameters():
        module = pname.rpartition(".")[0]
        p.requires_grad = ".adapters." in f".{pname}" or any(
            _matches(module, m) or f".{m}." in f".{module}." for m in modules_to_save)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` act in every LoRA linear (None: none act)."""
    for m in lora_modules(model).values():
        m.active = name if name is None or name in m.adapters else None


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block (DPO / RL reference); the adapters come back after."""
    mods = lora_modules(model)
    saved = {n: (m.active, m.row_adapters) for n, m in mods.items()}
    for m in mods.values():
        m.active, m.row_adapters = None, None
    try:
        yield
    finally:
        for n, m in mods.items():
            m.active, m.row_adapters = saved[n]


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Row b of the batch (dim 0 of every input: (B, T, C) in decode, (1, T, C) for one prefilled
    sequence) uses adapter names[b] (None: the base alone): many adapters in one batch. The rows of
    each adapter are gathered once here, not per linear; one adapter on every row costs what
    `set_adapter` does."""
    mods = lora_modules(model)
    devices = {m.weight.device for m in mods.values()}
    groups: dict[Any, list[tuple[str, torch.Tensor | None]]] = {d: [] for d in devices}
    for name in sorted({n for n in names if n is not None}):
        rows = [b for b, n in enumerate(names) if n == name]
        for d in devices:
            groups[d].append((name, None if len(rows) == len(names) else torch.tensor(rows, device=d)))
    for m in mods.values():
        m.row_adapters = (len(names), groups[m.weight.device])
    try:
        yield
    finally:
        for m in mods.values():
            m.row_adapters = None


def adapter_state_dict(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` (lmforge names: `MODULE.lora_A.SEGMENT.weight`) and of the
    modules trained in full (their own names)."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in lora_modules(model).items():
        if name in m.adapters:
            a = m.adapters[name]
            for s in a.segments:
                out[f"{mname}.lora_A.{s}.weight"] = a.lora_A[s].weight
                out[f"{mname}.lora_B.{s}.weight"] = a.lora_B[s].weight
    settings = getattr(model, "lora_settings", {}).get(name)
    for m in (settings.save_list() if settings else []):
        for pname, p in model.named_parameters():
            if ".adapters." not in pname and (f".{m}." in f".{pname}" or pname.startswith(f"{m}.")):
                out[pname.replace(".base.", ".")] = p
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the model under the adapters (the frozen base), in the names it had before
    `add_lora`: what a LoRA run records as its base when it has no base directory to point to."""
    tied = set(model.tied_state_keys()) if hasattr(model, "tied_state_keys") else set()  # stored once, as saved
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in f".{k}"}
    return {k: v for k, v in state.items() if k not in tied}


def merge_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (default: the active one) into plain fp32 linears, in place: the weights
    become base + scaling B A and the LoRA modules disappear. A quantised base is dequantised."""
    for full, m in lora_modules(model).items():
        w = m.merged_weight(name)
        lin = Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
        parent_name, _, child_name = full.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, lin)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    for p in model.parameters():
        p.requires_grad = True
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


_SEGMENT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<seg>[^.]+)\.weight$")


def parse_adapter_key(key: str) -> tuple[str, str, str] | None:
    """(module, "A"|"B", segment) of an `adapter_state_dict` key; None for a modules_to_save tensor."""
    m = _SEGMENT_KEY.match(key)
    return (m["module"], m["ab"], m["seg"]) if m else None
