"""The LM head fused with its cross entropy: the loss of `h @ w.T` without the (N, V) logits.

At a 50k vocabulary the logits of one 8 x 512 batch are 0.8 GB in fp32, and F.cross_entropy keeps
its log-softmax (another 0.8 GB) for backward, whose gradient is a third: more than a 124M model's
weights, gradients and AdamW moments together. `linear_cross_entropy` walks the rows in blocks and
computes both gradients in the same pass (softmax - one-hot is at hand then), so only a block's
logits ever exist and backward only scales the two stored gradients (Liger's fused linear cross
entropy; torchtune's chunked output loss does the row blocks without the fused gradients).
"""

from __future__ import annotations

import torch

from lmforge.nn.linear import onednn_linear, use_onednn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NC: torch.Tensor, w_VC: torch.Tensor, y_N: torch.Tensor, rows: int,
                ignore_index: int, softcap: float | None, grad_h: bool, grad_w: bool) -> torch.Tensor:
        N = h_NC.shape[0]
        valid_N = y_N != ignore_index
        inv = 1.0 / max(int(valid_N.sum()), 1)
        total = torch.zeros((), dtype=torch.float32, device=h_NC.device)
        grad_h_NC = torch.empty_like(h_NC) if grad_h else None
        grad_w_VC = torch.zeros_like(w_VC) if grad_w else None
        dnn = h_NC.dtype == torch.float32 and use_onednn(h_NC, w_VC)
        for s in range(0, N, rows):
            h_RC, y_R, ok_R = h_NC[s:s + rows], y_N[s:s + rows], valid_N[s:s + rows]
            z_RV = (onednn_linear(h_RC, w_VC) if dnn else h_RC @ w_VC.t()).float()
            if softcap:
                t_RV = torch.tanh(z_RV / softcap)
                z_RV = softcap * t_RV
            y_safe_R = torch.where(ok_R, y_R, 0)
            lse_R = torch.logsumexp(z_RV, dim=-1)
            picked_R = z_RV.gather(1, y_safe_R[:, None]).squeeze(1)
            total += ((lse_R - picked_R) * ok_R).sum()
            if not (grad_h or grad_w):
                continue
            g_RV = z_RV.sub_(lse_R[:, None]).exp_()  # softmax, in place
            g_RV.scatter_add_(1, y_safe_R[:, None], -ok_R[:, None].to(g_RV.dtype))
            g_RV.mul_((ok_R.to(g_RV.dtype) * inv)[:, None])
            if softcap:
                g_RV.mul_(1.0 - t_RV.square())
            g_RV = g_RV.to(h_NC.dtype)
            if grad_h:
                grad_h_NC[s:s + rows] = onednn_linear(g_RV, w_VC.t()) if dnn else g_RV @ w_VC
            if grad_w:
                if dnn:
                    grad_w_VC += onednn_linear(g_RV.t(), h_RC.t())
                else:
                    grad_w_VC.addmm_(g_RV.t(), h_RC)
        ctx.save_for_backward(grad_h_NC, grad_w_VC)
        return total * inv

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h_NC, grad_w_VC = ctx.saved_tensors
        return (None if grad_h_NC is None else grad_h_NC * grad_out,
                None if grad_w_VC is None else grad_w_VC * grad_out, None, None, None, None, None, None)


def linear_cross_entropy(h_NC: torch.Tensor, w_VC: torch.Tensor, y_N: torch.Tensor, *,
                         rows: int | None = None, ignore_index: int = -100,
                         softcap: float | None = None) -> torch.Tensor:
    """F.cross_entropy(softcap(h @ w.T), y, ignore_index) (the mean over counted rows) without
    materialising the logits. h and w share a dtype; the logits and softmax are fp32.

    rows: rows per block; default keeps a block's fp32 logits near 4 MiB (cache-sized), at least 64.
    """
    if rows is None:
        rows = max(64, (4 << 20) // (4 * w_VC.shape[0]))
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h_NC, w_VC, y_N, int(rows), ignore_index, softcap,
                                     grad and h_NC.requires_grad, grad and w_VC.requires_grad)
