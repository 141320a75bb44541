"""Teacher-target normalisation: DINO softmax centering and Sinkhorn-Knopp (SwAV / DINOv2).

Both turn teacher prototype logits into target distributions that are not collapsed onto a few
prototypes. Both are computed over the *global* batch (all ranks), so that the result does not depend on
how a batch is split across processes; the collectives used are `all_reduce` and (Sinkhorn-Knopp on CPU)
`all_gather` on the default group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _is_distributed() -> bool:
    """True when collectives are needed (an initialised group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fp32_at_least(x: Tensor) -> Tensor:
    """Half / bfloat16 -> float32; float32 / float64 unchanged (float64 keeps tests exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_logits(logits: Tensor, temp: float, name: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name}: expected teacher logits of shape [N, K], got {tuple(logits.shape)}")
    if not temp > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temp}")


class SoftmaxCenter(nn.Module):
    """DINO centering: subtract an EMA of the teacher's mean logits before a sharp softmax.

    Centering alone pushes towards uniform outputs and sharpening (low temperature) alone towards a
    one-hot collapse; together they balance (DINO, Caron et al. 2021, sec. 3.1).

    Order, as in DINO: at step t the targets use the centre of step t-1,
        probs_t = softmax((x_t - c_{t-1}) / temp)
    and only afterwards
        c_t = m * c_{t-1} + (1 - m) * mean over every row of x_t on every rank.
    The training loop must therefore call `probs(x, temp)` *before* `update(x)`.

    Plain-loop version of `update` (x_r: the [N_r, K] teacher logits on rank r):
        total = [0] * K;  count = 0
        for r in ranks:
            for n in range(N_r):
                for k in range(K): total[k] += x_r[n, k]
                count += 1
        for k in range(K): c[k] = m * c[k] + (1 - m) * total[k] / count
    Vectorised: one all_reduce of the concatenation [sum over rows (K values), N] so that ranks with
    unequal N are averaged correctly; if no rank has any row, the centre is left unchanged.
    """

    center: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"SoftmaxCenter: out_dim must be positive, got {out_dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SoftmaxCenter: momentum must be in [0, 1], got {momentum}")
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # [1, K]

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, momentum={self.momentum}"

    def _check(self, teacher_logits: Tensor) -> None:
        if teacher_logits.ndim != 2 or teacher_logits.shape[1] != self.out_dim:
            raise ValueError(
                f"SoftmaxCenter: expected teacher logits [N, {self.out_dim}], "
                f"got {tuple(teacher_logits.shape)}"
            )

    @torch.no_grad()
    def probs(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """Centred, sharpened teacher targets [N, K] in float32 (uses the centre from *before* update)."""
        self._check(teacher_logits)
        _check_logits(teacher_logits, temp, "SoftmaxCenter.probs")
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            x = _fp32_at_least(teacher_logits)  # [N, K]
            center = self.center.to(x.dtype)  # [1, K]
            return torch.softmax((x - center) / temp, dim=-1)  # [N, K]

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """EMA of the global batch mean of the teacher logits (synchronous all_reduce when distributed)."""
        self._check(teacher_logits)
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            x = teacher_logits.detach().to(self.center.device, torch.float32)  # [N, K]
            stats = torch.cat([x.sum(dim=0), x.new_full((1,), x.shape[0])])  # [K + 1]
            if _is_distributed():
                dist.all_reduce(stats)
            batch_sum, count = stats[:-1], stats[-1]  # [K], []
            batch_mean = (batch_sum / count.clamp_min(1.0)).unsqueeze(0)  # [1, K]
            new_center = self.center * self.momentum + batch_mean * (1.0 - self.momentum)  # [1, K]
            # torch.where rather than `if count > 0`: no host sync on GPU.
            self.center.copy_(torch.where(count > 0, new_center, self.center))


def _row_logsumexp_all_ranks(log_q: Tensor, across_ranks: bool = True) -> Tensor:
    """log(sum over samples of exp(log_q)) for each prototype, summed over all ranks: [N, K] -> [K].

    Two-pass reduction (max, then sum of shifted exps) so it is exact and stable whatever the spread of
    values across ranks; a rank with N == 0 still takes part in both collectives (no deadlock).
    `across_ranks=False`: this rank's rows only (they already hold the whole batch).
    """
    tiny = torch.finfo(log_q.dtype).min
    local = torch.logsumexp(log_q, dim=0)  # [K]  (-inf where this rank has no mass / no rows)
    if not (across_ranks and _is_distributed()):
        return local.clamp_min(tiny)
    shift = local.clone()  # [K]
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    shift = shift.clamp_min(tiny)  # all -inf -> finite, so exp(-inf - shift) = 0 and not nan
    total = torch.exp(local - shift)  # [K]
    dist.all_reduce(total)
    return (shift + torch.log(total)).clamp_min(tiny)  # [K]


# Below this size (all ranks' logits together) the CPU path gathers the whole batch and every rank runs
# Sinkhorn-Knopp on it alone: 2 collectives instead of 7 (each one a point where the ranks wait for each
# other: 8 % of a step of the 2-process CPU main job, BENCHMARKS.md section 6c). Above it (ViT-g's
# 65536 prototypes x thousands of crops) the log-domain iterations reduce [K] vectors instead.
GATHER_MAX_BYTES = 32 << 20


def _gather_rows(log_q: Tensor, max_bytes: int) -> tuple[list[int], Tensor | None]:
    """Every rank's row count, and all ranks' rows in rank order ([N_total, K]) when they fit in
    `max_bytes`, else None (the same answer on every rank: it depends on the gathered counts only)."""
    world = dist.get_world_size()
    counts_t = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts_t, torch.tensor([log_q.shape[0]], dtype=torch.int64))
    counts = [int(c) for c in counts_t]
    if sum(counts) * log_q.shape[1] * log_q.element_size() > max_bytes:
        return counts, None
    padded = log_q.new_zeros(max(counts), log_q.shape[1])  # [N_max, K]: all_gather needs equal shapes
    padded[: log_q.shape[0]] = log_q
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return counts, torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])  # [N_total, K]


def _sinkhorn_log_domain(log_q: Tensor, n_iters: int, n_total: Tensor, across_ranks: bool) -> Tensor:
    """The reference iterations in the log domain (see `sinkhorn_knopp`); [N, K] -> [N, K]."""
    log_k = math.log(log_q.shape[1])
    log_n = torch.log(n_total.clamp_min(1.0))  # []
    tiny = torch.finfo(log_q.dtype).min
    for _ in range(n_iters):
        log_q = log_q - (_row_logsumexp_all_ranks(log_q, across_ranks) + log_k)  # prototypes: 1/K each
        col_lse = torch.logsumexp(log_q, dim=1, keepdim=True).clamp_min(tiny)  # [N, 1]
        log_q = log_q - (col_lse + log_n)  # samples: mass 1/N_total each
    return torch.exp(log_q + log_n)  # [N, K], rows sum to 1


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iters: int = 3,
    n_rows_total: int | Tensor | None = None,
    fast: bool | None = None,
    gather_max_bytes: int = GATHER_MAX_BYTES,
) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV, used by DINOv2 for both DINO and iBOT heads).

    Finds Q close to softmax(logits / temp) whose prototype marginals are uniform over the *global*
    batch, i.e. an equipartition of samples over prototypes, which prevents collapse without a centre.

    Reference algorithm (Q is [K, N_local] per rank, N_total = rows over all ranks):
        Q = exp(logits / temp).T
        Q /= sum_all_ranks(Q)                         # total mass 1
        for _ in range(n_iters):
            for k in range(K):                          # prototypes: each gets mass 1/K
                Q[k, :] /= sum_all_ranks(Q[k, :]) * K
            for n in range(N_local):                    # samples: each gets mass 1/N_total
                Q[:, n] /= sum(Q[:, n]) * N_total
        return (Q * N_total).T                          # [N_local, K], every row sums to 1

    Implementation: the same iterations in the log domain, on [N, K] without transposing. Each
    normalisation is a subtraction of a (global) logsumexp, so nothing overflows or underflows even for
    temp = 0.04, where exp(logits / temp) overflows float32 and a single global max-shift would flush
    whole samples or prototypes to 0 (then 0/0 = nan). The initial "total mass 1" step only multiplies
    Q by a scalar that the first prototype normalisation divides out, so it is skipped. Prototype sums
    are taken across ranks with a max then a sum all_reduce (see `_row_logsumexp_all_ranks`); sample
    normalisation is local. The result is exactly the reference algorithm's (up to rounding), and equal
    to running it single-process on the concatenated batch.

    Distributed on CPU, when all ranks' logits together take at most `gather_max_bytes`: they are
    gathered (row counts, then rows), every rank runs the iterations on the whole batch by itself and
    keeps its own rows: the same result with 2 collectives instead of 1 + 2 * n_iters.

    Fast path (`_sinkhorn_by_scaling`, default on CPU): the same iterations as two scaling vectors on
    one matrix of exponentials, 1.5-5x cheaper on CPU; it checks its own precision and hands over to the
    log domain when the logits are too spread out for float32 exponentials.

    Args:
        teacher_logits: [N, K] local teacher logits (N may be 0 on some ranks; all ranks must call).
        temp: teacher temperature (> 0).
        n_iters: Sinkhorn iterations (>= 1; DINOv2 uses 3).
        n_rows_total: global number of rows N_total, used as given (not reduced again). Default: N
            summed over ranks. iBOT may pass the global count of masked patches.
        fast: try the scaling-vector path first. Default (None): on CPU, where its precision check (a
            host read) costs nothing; the log domain on CUDA (no host sync).
        gather_max_bytes: the gathered path's size limit (CPU, distributed); 0 turns it off.
    Returns:
        [N, K] float32 (float64 if the input is float64) targets whose rows sum to 1. Computed in fp32
        even under autocast, without gradient.
    """
    _check_logits(teacher_logits, temp, "sinkhorn_knopp")
    if n_iters < 1:
        raise ValueError(f"sinkhorn_knopp: n_iters must be >= 1, got {n_iters}")
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        log_q = _fp32_at_least(teacher_logits) / temp  # [N, K]
        n_local = log_q.shape[0]
        on_cpu = log_q.device.type == "cpu"
        fast = on_cpu if fast is None else fast
        distributed = _is_distributed()
        counts = None
        if distributed and on_cpu and gather_max_bytes > 0:
            counts, whole = _gather_rows(log_q, gather_max_bytes)
            if whole is not None:  # the whole batch here: no collective below
                start = sum(counts[: dist.get_rank()])
                total = n_rows_total if n_rows_total is not None else whole.shape[0]
                q = _sinkhorn_one_process(whole, n_iters, _as_count(total, whole), fast)  # [N_total, K]
                return q[start : start + n_local]
        if n_rows_total is not None:
            n_total = _as_count(n_rows_total, log_q)
        elif counts is not None:
            n_total = _as_count(sum(counts), log_q)
        else:
            n_total = _as_count(n_local, log_q)
            if distributed:
                dist.all_reduce(n_total)
        if not distributed:
            return _sinkhorn_one_process(log_q, n_iters, n_total, fast)
        return _sinkhorn_log_domain(log_q, n_iters, n_total, across_ranks=True)


def _as_count(n: int | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(n, device=like.device, dtype=like.dtype)  # []


def _sinkhorn_one_process(log_q: Tensor, n_iters: int, n_total: Tensor, fast: bool) -> Tensor:
    """Sinkhorn-Knopp on rows that are the whole batch: the scaling-vector path when asked for and
    precise enough, else the log domain."""
    if fast and log_q.shape[0] > 0:
        q = _sinkhorn_by_scaling(log_q, n_iters, n_total)
        if q is not None:
            return q
    return _sinkhorn_log_domain(log_q, n_iters, n_total, across_ranks=False)


def _sinkhorn_by_scaling(log_q: Tensor, n_iters: int, n_total: Tensor) -> Tensor | None:
    """Sinkhorn-Knopp as Q = diag(a) E diag(b): one exp, then only matrix-vector products.

    The reference normalisations only ever rescale whole prototype columns and whole sample rows, so
    Q stays E_nk * a_n * b_k with E = exp(log_q) fixed, and the iterations reduce to
        b = 1 / (K * (a @ E))          # [K]  prototypes: mass 1/K each (a = 1 at the start)
        a = 1 / (N_total * (E @ b))    # [N]  samples: mass 1/N_total each
    E is shifted by each column's max (a per-prototype factor the first prototype step divides out),
    so no prototype column underflows to zero. A sample row can still lose its mass when its logits
    sit far below every prototype's best sample: a row sum E @ b above `floor` keeps the row's largest
    term 2^24 above the smallest normal float (full fp32 precision where the mass is); below it, None
    is returned and the caller takes the log domain. That check reads a value on the host: CPU only.
    """
    n_protos = log_q.shape[1]
    n_total = n_total.clamp_min(1.0)  # []
    e = torch.exp(log_q - log_q.amax(dim=0, keepdim=True))  # [N, K], every column peaks at 1
    floor = torch.finfo(e.dtype).tiny * 2.0**24 * n_protos
    a = e.new_ones(e.shape[0])  # [N]
    row_min = []
    for _ in range(n_iters):
        b = 1.0 / (n_protos * (a @ e))  # [K]
        row_sum = e @ b  # [N]
        row_min.append(row_sum.min())
        a = 1.0 / (n_total * row_sum)  # [N]
    if not bool(torch.stack(row_min).min() >= floor):  # `not >=`: a nan (0 * inf) fails too
        return None
    return e * (a * n_total).unsqueeze(1) * b  # [N, K], rows sum to 1
