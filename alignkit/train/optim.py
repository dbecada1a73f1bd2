"""AdamW with its two moments held in bf16 (``optimizer_state=bf16``): half of AdamW's memory.

torch's AdamW keeps two float32 moments per parameter, 8 bytes a parameter: on SmolLM2-135M 1.03 GB, more than the
float32 weights themselves. :class:`AdamWBf16State` keeps them in bf16 (4 bytes a parameter) and computes each
update in float32, a slice of each tensor at a time (``chunk`` elements), so the float32 temporaries stay small:

    p  <- p * (1 - lr * wd)
    m  <- b1 * m + (1 - b1) * g                 (stored rounded to the nearest bf16)
    v  <- b2 * v + (1 - b2) * g^2               (stored rounded stochastically to bf16)
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

with ``m`` and ``v`` the float32 values before their rounding, so a step's update is torch's AdamW's from the
stored moments; the difference lies in the rounding of what is stored.

Why ``v`` is rounded stochastically: bf16 has 8 significant bits, so around a value ``v`` its spacing is
``2^-7 v`` to ``2^-8 v``. With ``b2 = 0.999`` a step moves ``v`` by ``0.001 (g^2 - v)``: unless the gradient's
square differs from ``v`` by a factor of about 1.5 or more, the change is under half a spacing and rounding to
the nearest value throws it away, every step: ``v`` stalls (``tests/test_optim.py`` shows it). Stochastic rounding
rounds up with probability equal to the distance to the lower neighbour over the spacing, so the stored value is
exact in expectation and ``v`` follows its float32 course on average. ``m`` moves by ``0.1 (g - m)``, which is
lost only when ``g`` is within about 2% of ``m`` already; it is rounded to the nearest.

The random bits are a function of (seed, step): one buffer of ``chunk`` draws per step, each slice of each tensor
using it from an offset that depends on the tensor, so a resumed run repeats an uninterrupted one's bits and
updates exactly. Non-finite gradients are the caller's to catch (the loop skips such a step before calling
:meth:`step`, as with torch's AdamW).
"""

from __future__ import annotations

import math

import torch

_LOW_BITS = -65536  # 0xFFFF0000 as an int32: clears the 16 bits bf16 drops from a float32


def round_stochastic_(dst: torch.Tensor, src: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Write float32 ``src`` into bf16 ``dst`` rounded stochastically with ``bits`` (int32 in [0, 2^16), src's
    shape): adding them to the float32's bit pattern carries into bf16's last bit with probability equal to the
    fraction the truncation drops, on the magnitude (IEEE floats are sign and magnitude), and the truncated pattern
    is a bf16 value exactly."""
    rounded = (src.contiguous().view(torch.int32) + bits) & _LOW_BITS
    return dst.copy_(rounded.view(torch.float32))


class AdamWBf16State(torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, bias correction) with bf16 moments; see the module docstring.

    Parameter groups, ``state_dict`` / ``load_state_dict`` and LR schedulers work as with any torch optimizer; the
    state of a parameter is ``step`` (a float32 scalar tensor, as torch's), ``exp_avg`` and ``exp_avg_sq`` (bf16).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, chunk: int = 1 << 20):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1): {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.chunk = seed, chunk
        # each parameter's place among all of them: its random bits do not depend on how the groups are cut
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._bits: tuple[int, torch.device, torch.Tensor] | None = None

    def _random_bits(self, step: int, device: torch.device) -> torch.Tensor:
        """The step's ``chunk`` draws, twice over (a slice of up to ``chunk`` of them starts at any offset)."""
        if self._bits is None or self._bits[:2] != (step, device):
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
            bits = torch.randint(0, 1 << 16, (self.chunk,), dtype=torch.int32, generator=gen).to(device)
            self._bits = (step, device, torch.cat([bits, bits]))
        return self._bits[2]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, which casts floating state to the parameter's dtype; the moments go back to bf16 (exactly:
        they were bf16 when saved)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("optimizer_state=bf16 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16,
                                                           memory_format=torch.contiguous_format)
                state["step"] += 1
                t = int(state["step"].item())
                bits = self._random_bits(t, p.device)
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], bits, lr=lr, b1=b1, b2=b2, eps=eps,
                             wd=wd, t=t, offset=(self._index[p] * 7919) % self.chunk)
        return loss

    def _update(self, p, grad, exp_avg, exp_avg_sq, bits, *, lr, b1, b2, eps, wd, t, offset) -> None:
        step_size = lr / (1 - b1 ** t)
        root_c2 = math.sqrt(1 - b2 ** t)
        if not p.is_contiguous():
            raise RuntimeError("optimizer_state=bf16 updates parameters through a flat view: a parameter is not "
                               "contiguous")
        work, g, m_bf, v_bf = p.view(-1), grad.reshape(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
        for lo in range(0, work.numel(), self.chunk):
            hi = min(lo + self.chunk, work.numel())
            gi = g[lo:hi].float()
            m = m_bf[lo:hi].float().lerp_(gi, 1 - b1)
            v = v_bf[lo:hi].float().mul_(b2).addcmul_(gi, gi, value=1 - b2)
            pi = work[lo:hi]
            if wd:
                pi.mul_(1 - lr * wd)
            pi.addcdiv_(m, v.sqrt().div_(root_c2).add_(eps), value=-step_size)
            m_bf[lo:hi].copy_(m)
            start = (offset + lo) % self.chunk
            round_stochastic_(v_bf[lo:hi], v, bits[start:start + hi - lo])
