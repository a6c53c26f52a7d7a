"""Hand-written forward/backward of the routed LoRA experts of a gated (Llama-family) MoE-LoRA layer.

The experts are memory-bound: per routed (token, expert) row they touch a few intermediate-size vectors and do
rank-r matmuls. Autograd would write and save a fresh [rows, intermediate] tensor for every elementwise op.
Here the rank-r matmuls run per expert on contiguous row groups, and everything elementwise is two functions
(`mix_forward`, `mix_backward`) that torch.compile turns into one fused loop each (impl "compiled"; impl
"fused" runs the same functions eagerly). `MoELoRAMLP`'s autograd path (impl "loop") is the reference both
are tested against.

The gate activation is the base MLP's own: SiLU (Llama, Mistral, Qwen2: SwiGLU), exact GELU or GELU-tanh
(Gemma's gelu_pytorch_tanh: GeGLU), `FUSED_ACTIVATIONS`. `fused_activation(module)` names the one a module
computes, or None for any other, which these kernels refuse (the layer then runs "loop" under "auto").

Rows are grouped by expert: rows [start_e, start_e + counts[e]) are routed to expert e. Inputs:
  xs [M, H]   routed tokens' inputs (LoRA dropout already applied)
  g, u [N, I] gate / up pre-activations of all tokens (one frozen matmul each, plus any shared-expert LoRA)
  a [N, I]    base activation act(g) * u
  a_in [E, 2r, H], b_in [E, 2, r, I], a_down [E, r, I], b_down [E, r, H]   (B factors stored rank-first)
  tok [M]     token of each row; inv [M] row of token-major assignment t*k + j; w [M] routing weight
Outputs: h [N, I] = a + sum_rows w (a_e - act(g)u[tok]), the input of the shared frozen down projection, and
yd [N, H] = sum_rows w s B_d A_d a_e, the experts' LoRA on the down projection.

The base activation is recomputed inside the same kernel as a_e, so with zero LoRA deltas the correction is an
exact zero whatever the kernel's rounding. h depends on the base path only through (1 - sum_rows w) = 0, so
neither `a` nor the subtracted term is differentiated (autograd would add two terms that cancel).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

FUSED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def fused_activation(module: torch.nn.Module) -> str | None:
    """The FUSED_ACTIVATIONS name of an activation module, if the kernels compute exactly what it computes
    (the same torch function); None otherwise (e.g. ReLU, or transformers' pure-Python GELU variants)."""
    name = type(module).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    fn = getattr(module, "act", None)
    if name == "GELUActivation" and fn is F.gelu:
        return "gelu"
    if name == "GELU" and isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh") and isinstance(fn, functools.partial) and fn.func is F.gelu \
            and fn.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def _act(x, act: str):
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def _act_and_grad(x, act: str):
    """(act(x), act'(x)) for a FUSED_ACTIVATIONS name."""
    if act == "silu":
        sig = torch.sigmoid(x)
        return x * sig, sig * (1 + x * (1 - sig))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2.0))))
        return F.gelu(x), cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))  # gelu_tanh
    return F.gelu(x, approximate="tanh"), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (
        1 + 3 * 0.044715 * x * x)


def mix_forward(g, u, tok, dg, du, w, act: str):
    """a_e = act(g[tok] + dg) * (u[tok] + du) and the weighted correction w * (a_e - act(g[tok]) * u[tok])."""
    g_t, u_t = g[tok], u[tok]
    a_e = _act(g_t + dg, act) * (u_t + du)
    wdiff = w.unsqueeze(1) * (a_e - _act(g_t, act) * u_t)
    return a_e, wdiff


def mix_backward(gh, g, u, tok, dg, du, w, extra, act: str):
    """Gradients of the pre-activations (d/d(g_t + dg), d/d(u_t + du)) and of w, given dL/dh = gh and the
    down-LoRA's dL/da_e = extra."""
    g_t, u_t, gh_t = g[tok], u[tok], gh[tok]
    gg, uu = g_t + dg, u_t + du
    val, grad = _act_and_grad(gg, act)
    d_w = (gh_t * (val * uu - _act(g_t, act) * u_t)).sum(1)
    da = w.unsqueeze(1) * gh_t + extra
    d_uu = da * val
    d_gg = da * uu * grad
    return d_gg, d_uu, d_w


def token_sum(rows, inv, k: int):
    """[M, D] rows grouped by expert -> [N, D] sum of each token's k rows (inv: sorted position of the
    token-major assignment t*k + j). A gather, so no scatter-add and no zero fill."""
    return rows[inv].view(-1, k, rows.shape[1]).sum(1)


def mix_h(a, wdiff, inv, k: int):
    """h = a + sum of the token's weighted corrections (exactly a while they are zero)."""
    return a + token_sum(wdiff, inv, k)


def grad_gate_up(d_gg, d_uu, inv, k: int):
    return token_sum(d_gg, inv, k), token_sum(d_uu, inv, k)


_EAGER = {f.__name__: f for f in (mix_forward, mix_backward, mix_h, grad_gate_up, token_sum)}


class _Kernels:
    """The elementwise functions, eager or compiled (compiled once per process, falling back to eager with a
    warning if torch.compile is unavailable, e.g. no C++ compiler)."""

    def __init__(self) -> None:
        self.compiled: dict = {}
        self.failed = False

    def __call__(self, name: str, compiled: bool, *args):
        if not compiled or self.failed:
            return _EAGER[name](*args)
        if name not in self.compiled:
            # Default (automatic) dynamic shapes: static kernels for a fixed batch shape, which compile
            # to faster loops than dynamic ones, and one dynamic recompile if shapes do vary.
            self.compiled[name] = torch.compile(_EAGER[name])
        try:
            return self.compiled[name](*args)
        except Exception as err:  # compile errors surface at the first call
            self.failed = True
            warnings.warn(
                f"torch.compile of the MoE-LoRA expert kernels failed ({err}); using eager kernels", stacklevel=2
            )
            return _EAGER[name](*args)


KERNELS = _Kernels()


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class Groups:
    """How the routed rows are laid out by expert, and the per-expert products over that layout.

    ragged (`cap` None): rows [start_e, start_e + counts[e]) belong to expert e; each product is a loop of
    matmuls over the experts. padded (`cap` set): expert e owns rows [e * cap, (e + 1) * cap), the unused ones
    with routing weight 0 and zero inputs; each product is one batched matmul over [E, cap, ...] views, which
    keeps every thread busy where 8-16 small matmuls a product do not (on 2 threads, each of those small
    matmuls runs below the speed of the large frozen ones)."""

    def __init__(self, counts: list[int] | None, cap: int | None, experts: int):
        self.counts, self.cap, self.experts = counts, cap, experts

    def mm(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row groups of x [R, K] times w[e] [K, N] (any strides) -> [R, N]."""
        if self.cap:
            y = torch.bmm(x.reshape(self.experts, self.cap, x.shape[1]), w).view(-1, w.shape[-1])
            if out is not None:
                out.copy_(y)
                return out
            return y
        if out is None:
            out = x.new_empty(x.shape[0], w.shape[-1])
        for e, sl in _segments(self.counts):
            torch.mm(x[sl], w[e], out=out[sl])
        return out

    def wgrad(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per expert a_seg^T @ b_seg (a [R, Ka], b [R, Nb]) into out [E, Ka, Nb]; experts without rows get 0."""
        if self.cap:
            torch.bmm(a.reshape(self.experts, self.cap, a.shape[1]).transpose(1, 2),
                      b.reshape(self.experts, self.cap, b.shape[1]), out=out)
            return out
        out.zero_()
        a_t = a.T.contiguous()  # row-major [Ka, R]: its slices multiply about twice as fast as a[sl].T on CPU
        for e, sl in _segments(self.counts):
            torch.mm(a_t[:, sl], b[sl], out=out[e])
        return out


def padded_capacity(counts: list[int], max_padding: float) -> int | None:
    """Rows per expert of the padded layout (the largest expert's count, rounded up to 8), or None when that
    would add more than `max_padding` - 1 of the rows (unbalanced routing: the ragged loop then)."""
    if max_padding <= 1 or not counts:
        return None
    cap = -(-max(counts) // 8) * 8
    return cap if cap * len(counts) <= max_padding * max(sum(counts), 1) else None


class RoutedGatedLoRA(torch.autograd.Function):
    """The routed experts of a gated MLP (see the module docstring); `act` is a FUSED_ACTIVATIONS name."""

    @staticmethod
    def forward(ctx, xs, g, u, a, tok, inv, w, a_in, b_in, a_down, b_down, groups, scaling, dropout_p, compiled,
                act):
        k = inv.shape[0] // g.shape[0]
        r, s = a_down.shape[1], scaling
        # Input-side LoRA deltas per expert: t = s xs A_in^T, (dg, du) = t B_in^T.
        t = groups.mm(xs, a_in.transpose(1, 2))
        t.mul_(s)
        dg = groups.mm(t[:, :r], b_in[:, 0])
        du = groups.mm(t[:, r:], b_in[:, 1])
        a_e, wdiff = KERNELS("mix_forward", compiled, g, u, tok, dg, du, w, act)
        h = KERNELS("mix_h", compiled, a, wdiff, inv, k)
        del wdiff
        mask = None
        a_lora = a_e
        if dropout_p > 0:
            mask = torch.empty_like(a_e).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            a_lora = a_e * mask
        # Down-projection LoRA per expert: v = s a_lora A_d^T, rows (w v) B_d^T summed into their tokens.
        v = groups.mm(a_lora, a_down.transpose(1, 2))
        v.mul_(s)
        vw = v * w.unsqueeze(1)
        y_rows = groups.mm(vw, b_down)
        yd = KERNELS("token_sum", compiled, y_rows, inv, k)
        ctx.save_for_backward(xs, g, u, tok, inv, w, a_in, b_in, a_down, b_down, t, dg, du, a_e, v, mask)
        ctx.groups, ctx.scaling, ctx.compiled, ctx.k, ctx.act = groups, scaling, compiled, k, act
        return h, yd

    @staticmethod
    def backward(ctx, gh, gyd):
        xs, g, u, tok, inv, w, a_in, b_in, a_down, b_down, t, dg, du, a_e, v, mask = ctx.saved_tensors
        groups, s = ctx.groups, ctx.scaling
        r = a_down.shape[1]
        wc = w.unsqueeze(1)
        gh, gyd = gh.contiguous(), gyd.contiguous()
        # Down-projection LoRA.
        gy_t = gyd.index_select(0, tok)
        dvw = groups.mm(gy_t, b_down.transpose(1, 2))
        d_b_down = groups.wgrad(v * wc, gy_t, torch.empty_like(b_down))
        del gy_t
        dw_down = (dvw * v).sum(1)
        dv = dvw.mul_(wc * s)  # dL/dv * s
        a_lora = a_e if mask is None else a_e * mask
        d_a_down = groups.wgrad(dv, a_lora, torch.empty_like(a_down))
        extra = groups.mm(dv, a_down)  # dL/da_e through the down LoRA
        del a_lora
        if mask is not None:
            extra.mul_(mask)
        d_gg, d_uu, d_w = KERNELS("mix_backward", ctx.compiled, gh, g, u, tok, dg, du, w, extra, ctx.act)
        del extra
        # Input-side LoRA: (g_t + dg), dg = t_g B_g^T,  t = s xs A_in^T.
        dt = torch.empty_like(t)
        groups.mm(d_gg, b_in[:, 0].transpose(1, 2), out=dt[:, :r])
        groups.mm(d_uu, b_in[:, 1].transpose(1, 2), out=dt[:, r:])
        d_b_in = torch.empty_like(b_in)
        d_b_in[:, 0] = groups.wgrad(t[:, :r], d_gg, torch.empty_like(b_in[:, 0]))
        d_b_in[:, 1] = groups.wgrad(t[:, r:], d_uu, torch.empty_like(b_in[:, 1]))
        dt.mul_(s)
        d_a_in = groups.wgrad(dt, xs, torch.empty_like(a_in))
        dxs = groups.mm(dt, a_in) if ctx.needs_input_grad[0] else None
        d_g = d_u = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_g, d_u = KERNELS("grad_gate_up", ctx.compiled, d_gg, d_uu, inv, ctx.k)
        dw = d_w + dw_down
        return dxs, d_g, d_u, None, None, None, dw, d_a_in, d_b_in, d_a_down, d_b_down, None, None, None, None, None
