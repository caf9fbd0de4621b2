"""Weight-only quantisation: `QuantizedLinear` / `QuantizedEmbedding` replace a model's linears by name.

    int8  per output channel, symmetric: w = q * scale            q int8 (N, K), scale (N,)
    int4  per group of `group_size` inputs, asymmetric: w = q * scale + min, q in 0..15, stored as
          PyTorch's x86 int4 kernel wants it (two rows per byte, in blocks of 64 rows) with
          scale_zero (K/group, N, 2) = (scale, min + 8 * scale)

Matmuls run on the kernels PyTorch ships (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`)
with bf16 activations: on x86 they are vectorised for bf16 and about 3x faster than the fp32 oneDNN
matmul at batch 1, while fp32 activations take a scalar path about 4x slower than fp32 oneDNN
(docs/benchmarks.md). Inputs are cast to bf16 and the result back to the input dtype, so the rest
of the model computes in fp32. Widths the kernels cannot take (int8: K % 16, int4: K % group,
N % 64) are padded with zero weights, which padded inputs multiply by zero.

`quantize_model` replaces every `nn.Linear` except `lm_head` in place; with `embeddings` also
`tok_emb` (int8 rows, or int4 groups with int4) and the head (one table when they are tied).
Models know nothing of this: the replacements are small modules with `dequantize()` (the fp
reference, and what LoRA adapters later build on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LMForgeError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
COMPUTE_DTYPE = torch.bfloat16  # the activations the kernels are vectorised for on x86 (measured)
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm reads K in blocks of 16 (other K crash or give garbage)
INT4_N_BLOCK = 64  # _weight_int4pack_mm_for_cpu packs rows in blocks of 64
HEAD, EMBEDDING = "lm_head", "tok_emb"


@dataclass(frozen=True)
class QuantConfig:
    """What a quantised model directory records under "quantization" in model_config.json."""
    scheme: str
    group_size: int | None = None  # int4 only
    embeddings: bool = False  # tok_emb and lm_head quantised too
    compute_dtype: str = "bfloat16"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "QuantConfig":
        if not isinstance(data, dict) or set(data) - {"scheme", "group_size", "embeddings", "compute_dtype"}:
            raise LMForgeError(f"{where}: 'quantization' must be an object with scheme, group_size, embeddings")
        return quant_config(data.get("scheme"), data.get("group_size"), bool(data.get("embeddings", False)))


def quant_config(scheme: Any, group_size: Any = None, embeddings: bool = False) -> QuantConfig:
    """A checked QuantConfig (int4's group size defaults to 128; int8 takes none)."""
    if scheme not in SCHEMES:
        raise LMForgeError(f"unknown quantisation scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if scheme == "int8":
        if group_size is not None:
            raise LMForgeError("--group-size applies to int4 only; int8 has one scale per output channel")
        return QuantConfig("int8", None, embeddings)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise LMForgeError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    return QuantConfig("int4", group_size, embeddings)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---- int4 storage: the x86 kernel's layout -------------------------------------------------------
# Byte [b, k, j] of the packed (N/64, K, 32) table holds row 64b+j of column k in its low nibble and
# row 64b+32+j in its high nibble (what torch._convert_weight_to_int4pack_for_cpu(q, 2) returns).

def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) kernel layout of int4 values q (N, K) in 0..15, N a multiple of 64."""
    N, K = q_NK.shape
    q = q_NK.to(torch.uint8).view(N // INT4_N_BLOCK, 2, INT4_N_BLOCK // 2, K)
    return (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 (len(rows), K) int4 values of the given rows of a packed table."""
    table = packed.view(-1, K, INT4_N_BLOCK // 2)
    r = rows % INT4_N_BLOCK
    bytes_RK = table[rows // INT4_N_BLOCK, :, r % (INT4_N_BLOCK // 2)]
    return (bytes_RK >> (4 * (r // (INT4_N_BLOCK // 2)))[:, None].to(torch.uint8)) & 15


def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale bf16 (N,)): symmetric per row; q from the bf16 scale the kernel reads."""
    scale_N = (w_NK.float().abs().amax(1) / 127).clamp(min=1e-12).to(COMPUTE_DTYPE)
    q_NK = (w_NK.float() / scale_N.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q_NK, scale_N


def quantize_int4(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scale_zero bf16 (K/group, N, 2)): asymmetric per group of inputs,
    w = (q - 8) * scale + zero (the kernel's form; zero = min + 8 * scale)."""
    N, K = w_NK.shape
    w_NGS = w_NK.float().view(N, K // group_size, group_size)
    lo, hi = w_NGS.amin(-1), w_NGS.amax(-1)
    scale_NG = ((hi - lo) / 15).clamp(min=1e-12).to(COMPUTE_DTYPE)
    zero_NG = (lo + 8 * scale_NG.float()).to(COMPUTE_DTYPE)
    q_NGS = ((w_NGS - zero_NG.float()[..., None]) / scale_NG.float()[..., None] + 8).round().clamp(0, 15)
    return q_NGS.view(N, K).to(torch.uint8), torch.stack([scale_NG, zero_NG], -1).transpose(0, 1).contiguous()


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(qweight).T + bias, computed by PyTorch's int8 / int4 weight-only kernels.

    State: `qweight` (int8 (N, Kp) or packed uint8 (Np, Kp/2)), `scales` (int8: (N,); int4: (Kp/group,
    Np, 2) scale and zero), `bias` (fp32, as the linear had). Kp, Np: the widths padded for the kernel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group_size: int | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        if scheme == "int8":
            self.k_padded, self.n_padded = _ceil_to(in_features, INT8_K_MULTIPLE), out_features
            self.register_buffer("qweight", torch.empty(out_features, self.k_padded, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device))
        else:
            self.k_padded, self.n_padded = _ceil_to(in_features, group_size), _ceil_to(out_features, INT4_N_BLOCK)
            self.register_buffer("qweight", torch.empty(self.n_padded, self.k_padded // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(self.k_padded // group_size, self.n_padded, 2,
                                                       dtype=COMPUTE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.register_load_state_dict_post_hook(_aligned_copies)

    @classmethod
    def from_weight(cls, w_NK: torch.Tensor, bias_N: torch.Tensor | None, scheme: str,
                    group_size: int | None = None) -> "QuantizedLinear":
        N, K = w_NK.shape
        m = cls(K, N, bias_N is not None, scheme, group_size, device=w_NK.device)
        w = F.pad(w_NK.detach().float(), (0, m.k_padded - K, 0, m.n_padded - N))  # zero rows/columns of padding
        with torch.no_grad():
            if scheme == "int8":
                m.qweight, m.scales = quantize_int8(w)
            else:
                q_NK, m.scales = quantize_int4(w, group_size)
                m.qweight = pack_int4(q_NK)
            if bias_N is not None:
                m.bias.copy_(bias_N.detach().float())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None) -> "QuantizedLinear":
        return cls.from_weight(linear.weight, linear.bias, scheme, group_size)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) @ W.T (+ bias) in bf16 on the kernel, back in x's dtype."""
        x_MK = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x_MK.requires_grad:  # QLoRA: gradients flow to x through the frozen W
            y_MN = _QuantizedMatmul.apply(x_MK, self)
        else:
            y_MN = self._kernel(x_MK)
        if bias is not None:
            y_MN = y_MN + bias  # bf16 + fp32 bias: one op that also returns fp32
        return y_MN.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _kernel(self, x_MK: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W.T on PyTorch's weight-only kernel, in bf16: (M, N)."""
        x_MK = x_MK.to(COMPUTE_DTYPE)
        if self.k_padded != self.in_features:
            x_MK = F.pad(x_MK, (0, self.k_padded - self.in_features))
        if self.scheme == "int8":
            return torch._weight_int8pack_mm(x_MK, self.qweight, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x_MK, self.qweight, self.group_size, self.scales)[:, :self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The dequantised fp32 rows `idx` (any shape) of the weight: (*idx.shape, K)."""
        flat = idx.reshape(-1)
        if self.scheme == "int8":
            w_RK = self.qweight[flat].float() * self.scales[flat].float()[:, None]
        else:
            G = self.group_size
            w_RGS = unpack_int4_rows(self.qweight, flat, self.k_padded).float().view(len(flat), -1, G)
            sz_RG2 = self.scales[:, flat].float().transpose(0, 1)
            # (q - 8) * scale + zero in place: one (R, K) fp32 tensor, not four (QLoRA's backward runs this per linear)
            w_RK = w_RGS.sub_(8).mul_(sz_RG2[..., :1]).add_(sz_RG2[..., 1:]).view(len(flat), -1)
        return w_RK[:, :self.in_features].view(*idx.shape, self.in_features)

    def input_grad(self, dy_MN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dy @ W for the frozen weight: the gradient of x (QLoRA), in fp32 with W dequantised and freed after."""
        return (dy_MN.float() @ self.dequantize()).to(dtype)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K) the kernel multiplies by (the reference of its matmul)."""
        return self.rows(torch.arange(self.out_features, device=self.qweight.device))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}{group}")


class _QuantizedMatmul(torch.autograd.Function):
    """The kernel's x @ W.T with a backward for x only (PyTorch's int kernels have none): the weight
    is frozen, and dx = dy @ W (fp32) with W dequantised for the backward and freed after it."""

    @staticmethod
    def forward(ctx: Any, x_MK: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x_MK.dtype
        return layer._kernel(x_MK)

    @staticmethod
    def backward(ctx: Any, dy_MN: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.layer.input_grad(dy_MN, ctx.dtype), None


def _aligned_copies(module: QuantizedLinear, incompatible_keys: Any) -> None:
    # The kernels read weights with aligned vector loads (a misaligned one crashes the process), and
    # tensors assigned from a safetensors file start wherever the file puts them: copy those.
    for name in ("qweight", "scales"):
        t = getattr(module, name)
        if t.device.type == "cpu" and t.data_ptr() % 16:
            setattr(module, name, t.clone())


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table stored like a QuantizedLinear (rows = tokens); the tied LM head multiplies by it."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows(idx)

    @property
    def weight(self) -> torch.Tensor:
        # Callers read `tok_emb.weight.device / .dtype` for where the model computes and in what
        # dtype (KV caches, inputs): an empty tensor answers both without a second copy of the table.
        return torch.empty(0, device=self.qweight.device)


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model whose embedding is quantised: logits = x @ table.T, no state of its own."""

    def __init__(self, table: QuantizedEmbedding):
        super().__init__()
        self.__dict__["table"] = table  # not a submodule: its tensors are saved once, under tok_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.matmul(x)


# ---- whole models -------------------------------------------------------------------------------------

def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig a model was quantised with, or None for a full-precision model."""
    return getattr(model, "quantization", None)


def _replace_modules(model: nn.Module, qc: QuantConfig, make_linear: Callable[[str, nn.Linear], nn.Module],
                     make_embedding: Callable[[str, nn.Embedding], QuantizedEmbedding]) -> None:
    for parent_name, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        for name, child in children.items():
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear) and name != HEAD:
                setattr(parent, name, make_linear(full, child))
        if not qc.embeddings or not isinstance(children.get(EMBEDDING), nn.Embedding):
            continue
        emb, head = children[EMBEDDING], children.get(HEAD)
        if not isinstance(head, nn.Linear):
            raise LMForgeError("--quantize-embeddings needs a model with an LM head (decoders, T5/BART); "
                               f"this {type(model).__name__} keeps its embeddings in full precision")
        table = make_embedding(f"{parent_name}.{EMBEDDING}" if parent_name else EMBEDDING, emb)
        parent.tok_emb = table
        tied = head.weight is emb.weight
        parent.lm_head = TiedQuantizedHead(table) if tied else make_linear(f"{parent_name}.{HEAD}", head)


def _check_widths(model: nn.Module, qc: QuantConfig) -> None:
    if qc.scheme != "int4":
        return
    cfg = getattr(model, "cfg", None)
    width = getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    if width is not None and width % qc.group_size:
        raise LMForgeError(f"int4 group size {qc.group_size} does not divide the model width {width}; choose "
                           f"one of {', '.join(str(g) for g in GROUP_SIZES if width % g == 0) or 'int8'}")


def quantize_model(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Quantise `model` in place (one layer at a time, each fp weight freed once replaced); returns it."""
    done = quantization_of(model)
    if done is not None:
        raise LMForgeError(f"the model is already quantised ({done.scheme}); quantise the original "
                           "full-precision model instead")
    _check_widths(model, qc)
    _replace_modules(
        model, qc,
        lambda name, lin: QuantizedLinear.from_linear(lin, qc.scheme, qc.group_size),
        lambda name, emb: QuantizedEmbedding.from_weight(emb.weight, None, qc.scheme, qc.group_size))
    model.quantization = qc
    return model


def quantized_skeleton(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """`model` (built on the meta device) with empty quantised modules where `quantize_model` puts them,
    ready for `to_empty` and the saved state: the fp weights are never allocated."""
    def empty(cls, mod, bias):
        K, N = (mod.in_features, mod.out_features) if isinstance(mod, nn.Linear) else (mod.embedding_dim,
                                                                                          mod.num_embeddings)
        return cls(K, N, bias, qc.scheme, qc.group_size, device="meta")

    _check_widths(model, qc)
    _replace_modules(model, qc, lambda name, lin: empty(QuantizedLinear, lin, lin.bias is not None),
                     lambda name, emb: empty(QuantizedEmbedding, emb, False))
    model.quantization = qc
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model's checkpoint holds (parameters and persistent buffers, shared ones once)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def check_device(qc: QuantConfig, device: str | torch.device) -> None:
    """int4 has PyTorch's x86 CPU kernel only; int8 runs wherever `_weight_int8pack_mm` does (CPU, CUDA)."""
    if qc.scheme == "int4" and torch.device(device).type != "cpu":
        raise LMForgeError(f"int4 weights run on PyTorch's x86 CPU kernel; use --device cpu or --quantize int8 "
                           f"on {torch.device(device).type}")


def dequantize_model(model: nn.Module) -> nn.Module:
    """The reverse of `quantize_model`, in place: every quantised module becomes its fp32 original with
    the weights the kernels multiply by (`dequantize()`), ties restored; returns the model."""
    from lmforge.nn.linear import Linear

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedEmbedding):
                emb = nn.Embedding(child.out_features, child.in_features, device=child.qweight.device)
                with torch.no_grad():
                    emb.weight.copy_(child.dequantize())
                setattr(parent, name, emb)
                head = getattr(parent, HEAD, None)
                if isinstance(head, TiedQuantizedHead):
                    lin = Linear(child.in_features, child.out_features, bias=False, device=emb.weight.device)
                    lin.weight = emb.weight
                    setattr(parent, HEAD, lin)
            elif isinstance(child, QuantizedLinear):
                lin = Linear(child.in_features, child.out_features, bias=child.bias is not None,
                             device=child.qweight.device)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    if hasattr(model, "quantization"):
        model.quantization = None
    return model
