"""Hand-written forward/backward of the routed LoRA experts of a SwiGLU (Llama-family) MoE-LoRA layer.

The experts are memory-bound on CPU: per routed (token, expert) row they touch a few intermediate-size vectors
and do rank-r matmuls. Autograd would allocate and save a fresh tensor per elementwise op; this function does
the same math with in-place updates, fused `addmm_` for "base + LoRA delta", and saves only what backward
needs, which is what brings the layer close to the dense MLP's cost. `MoELoRAMLP`'s autograd path
(`impl="loop"`) is the reference it is tested against.

Rows are grouped by expert: rows [start_e, start_e + counts[e]) are routed to expert e. Inputs:
  xs [M, H]   routed tokens' inputs (LoRA dropout already applied)
  g, u [N, I] base gate / up pre-activations of all tokens (one frozen matmul each)
  a [N, I]    base activation silu(g) * u, detached: h depends on it only through (1 - sum_e w_e) a = 0
  tok [M]     token of each row; w [M] its renormalised routing weight
Outputs: h [N, I] = a + sum_rows w (a_e - a[tok]) (input of the shared frozen down projection) and
yd [N, H] = sum_rows w * s * B_d A_d a_e (the experts' LoRA on the down projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class RoutedSwiGLULoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, g, u, a, tok, w, a_in, b_in, a_down, b_down, counts, scaling, dropout_p):
        n_tok, inter = g.shape
        rows, hidden = xs.shape
        r = a_down.shape[1]
        s = scaling
        t = torch.empty(rows, 2 * r, dtype=xs.dtype, device=xs.device)
        g_hat = g.index_select(0, tok)
        u_hat = u.index_select(0, tok)
        for e, sl in _segments(counts):
            torch.mm(xs[sl], a_in[e].T, out=t[sl])
        t.mul_(s)
        for e, sl in _segments(counts):
            g_hat[sl].addmm_(t[sl, :r], b_in[e, 0].T)
            u_hat[sl].addmm_(t[sl, r:], b_in[e, 1].T)
        sil = F.silu(g_hat)
        a_e = sil * u_hat
        # Corrections to the base activation: exact zeros while every B is zero.
        diff = a.index_select(0, tok)
        torch.sub(a_e, diff, out=diff)
        diff.mul_(w.unsqueeze(1))
        h = a.index_add(0, tok, diff)
        del diff
        mask = None
        a_lora = a_e
        if dropout_p > 0:
            mask = torch.empty_like(a_e).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            a_lora = a_e * mask
        v = torch.empty(rows, r, dtype=xs.dtype, device=xs.device)
        for e, sl in _segments(counts):
            torch.mm(a_lora[sl], a_down[e].T, out=v[sl])
        v.mul_(s)
        vw = v * w.unsqueeze(1)
        y_rows = torch.empty(rows, hidden, dtype=xs.dtype, device=xs.device)
        for e, sl in _segments(counts):
            torch.mm(vw[sl], b_down[e].T, out=y_rows[sl])
        yd = torch.zeros(n_tok, hidden, dtype=xs.dtype, device=xs.device).index_add_(0, tok, y_rows)
        ctx.save_for_backward(xs, a, tok, w, a_in, b_in, a_down, b_down, t, g_hat, u_hat, sil, a_e, v, mask)
        ctx.counts, ctx.scaling, ctx.inter = counts, scaling, inter
        return h, yd

    @staticmethod
    def backward(ctx, gh, gyd):
        xs, a, tok, w, a_in, b_in, a_down, b_down, t, g_hat, u_hat, sil, a_e, v, mask = ctx.saved_tensors
        counts, s = ctx.counts, ctx.scaling
        r = a_down.shape[1]
        wc = w.unsqueeze(1)
        # Down-projection LoRA: y_rows = (w v) B_d^T,  v = s a_lora A_d^T.
        gy_t = gyd.index_select(0, tok)
        dvw = torch.empty_like(v)
        d_b_down = torch.zeros_like(b_down)
        vw = v * wc
        for e, sl in _segments(counts):
            torch.mm(gy_t[sl], b_down[e], out=dvw[sl])
            torch.mm(gy_t[sl].T, vw[sl], out=d_b_down[e])
        del gy_t
        dw = (dvw * v).sum(1)
        dv = dvw.mul_(wc)
        a_lora = a_e if mask is None else a_e * mask
        d_a_down = torch.zeros_like(a_down)
        for e, sl in _segments(counts):
            torch.mm(dv[sl].T, a_lora[sl], out=d_a_down[e])
        d_a_down.mul_(s)
        del a_lora
        # h = a + sum w (a_e - a[tok]):  dL/dw = <gh[tok], a_e> - <gh, a>[tok].
        gh_t = gh.index_select(0, tok)
        dw += torch.bmm(gh_t.unsqueeze(1), a_e.unsqueeze(2)).view(-1)
        dw -= torch.bmm(gh.unsqueeze(1), a.unsqueeze(2)).view(-1).index_select(0, tok)
        da = gh_t.mul_(wc)  # dL/da_e, built in place
        if mask is None:
            for e, sl in _segments(counts):
                da[sl].addmm_(dv[sl], a_down[e], alpha=s)
        else:
            extra = torch.empty_like(da)
            for e, sl in _segments(counts):
                torch.mm(dv[sl], a_down[e], out=extra[sl])
            da.add_(extra.mul_(mask), alpha=s)
            del extra
        du_hat = da * sil
        dg_hat = torch.ops.aten.silu_backward(da.mul_(u_hat), g_hat)
        del da
        # Input-side LoRA: g_hat = g[tok] + t_g B_g^T (same for up),  t = s xs A_in^T.
        dt = torch.empty_like(t)
        d_b_in = torch.zeros_like(b_in)
        for e, sl in _segments(counts):
            torch.mm(dg_hat[sl], b_in[e, 0], out=dt[sl, :r])
            torch.mm(du_hat[sl], b_in[e, 1], out=dt[sl, r:])
            torch.mm(dg_hat[sl].T, t[sl, :r], out=d_b_in[e, 0])
            torch.mm(du_hat[sl].T, t[sl, r:], out=d_b_in[e, 1])
        dt.mul_(s)
        d_a_in = torch.zeros_like(a_in)
        dxs = torch.empty_like(xs) if ctx.needs_input_grad[0] else None
        for e, sl in _segments(counts):
            torch.mm(dt[sl].T, xs[sl], out=d_a_in[e])
            if dxs is not None:
                torch.mm(dt[sl], a_in[e], out=dxs[sl])
        dg = du = None
        n_tok = a.shape[0]
        if ctx.needs_input_grad[1]:
            dg = torch.zeros(n_tok, ctx.inter, dtype=a.dtype, device=a.device).index_add_(0, tok, dg_hat)
        if ctx.needs_input_grad[2]:
            du = torch.zeros(n_tok, ctx.inter, dtype=a.dtype, device=a.device).index_add_(0, tok, du_hat)
        return dxs, dg, du, None, None, dw, d_a_in, d_b_in, d_a_down, d_b_down, None, None, None
