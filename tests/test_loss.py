"""SSL loss terms against independent references (explicit loops in numpy float64), incl. 2-rank gloo."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.spatial.distance import cdist
from testkit import free_port

from dinolike.loss import (
    SoftmaxCenter,
    dino_loss,
    ibot_loss,
    ibot_masks_weight,
    koleo_loss,
    sinkhorn_knopp,
)

# ----------------------------------------------------------------------------- references (numpy, loops)


def _log_softmax_np(v: np.ndarray) -> np.ndarray:
    v = v - v.max()
    return v - np.log(np.exp(v).sum())


def _softmax_np(v: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax_np(v))


def _ref_sinkhorn(logits: np.ndarray, temp: float, n_iters: int, n_total: float | None = None) -> np.ndarray:
    """SwAV / DINOv2 Sinkhorn in the linear domain, float64, loops over prototypes and samples."""
    q = np.exp((logits - logits.max()) / temp).T.astype(np.float64)  # [K, N]
    q /= q.sum()
    n_protos, n_samples = q.shape
    n_total = float(n_samples) if n_total is None else float(n_total)
    for _ in range(n_iters):
        for k in range(n_protos):
            q[k, :] /= q[k, :].sum() * n_protos
        for n in range(n_samples):
            q[:, n] /= q[:, n].sum() * n_total
    return (q * n_total).T  # [N, K]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- DINO


@pytest.mark.parametrize(
    ("n_s", "n_t", "ignore_diagonal"),
    [(2, 2, False), (2, 2, True), (3, 2, True), (6, 2, False), (1, 2, False)],
)
def test_dino_loss_matches_pairwise_loops(n_s: int, n_t: int, ignore_diagonal: bool) -> None:
    rng = _rng(0)
    batch, n_protos, s_temp = 4, 7, 0.1
    student = rng.normal(size=(n_s, batch, n_protos)) * 2.0
    teacher = np.stack(
        [[_softmax_np(rng.normal(size=n_protos) * 3) for _ in range(batch)] for _ in range(n_t)]
    )

    total, n_pairs = 0.0, 0
    for s in range(n_s):
        for t in range(n_t):
            if ignore_diagonal and s == t:
                continue
            for b in range(batch):
                log_p = _log_softmax_np(student[s, b] / s_temp)
                total += -sum(teacher[t, b, k] * log_p[k] for k in range(n_protos))
            n_pairs += 1
    expected = total / (n_pairs * batch)

    got64 = dino_loss(torch.from_numpy(student), torch.from_numpy(teacher), s_temp, ignore_diagonal)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(expected, rel=1e-10)
    got32 = dino_loss(
        torch.from_numpy(student).float(), torch.from_numpy(teacher).float(), s_temp, ignore_diagonal
    )
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_diagonal_is_mean_of_crossed_pairs_and_grads_flow() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 5), dim=-1)
    crossed = dino_loss(student, teacher, ignore_diagonal=True)
    pair_01 = dino_loss(student[0:1], teacher[1:2])
    pair_10 = dino_loss(student[1:2], teacher[0:1])
    torch.testing.assert_close(crossed, (pair_01 + pair_10) / 2)
    assert crossed.item() != pytest.approx(dino_loss(student, teacher).item())
    crossed.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dino_loss_bad_shapes() -> None:
    with pytest.raises(ValueError, match="no \\(student, teacher\\) pair"):
        dino_loss(torch.randn(1, 2, 3), torch.rand(1, 2, 3), ignore_diagonal=True)
    with pytest.raises(ValueError, match="differ"):
        dino_loss(torch.randn(2, 2, 3), torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="expected"):
        dino_loss(torch.randn(2, 3), torch.rand(2, 3))


# ----------------------------------------------------------------------------- iBOT


def test_ibot_loss_varying_masks_matches_per_crop_loop() -> None:
    rng = _rng(1)
    n_crops, n_patches, n_protos, s_temp = 5, 9, 6, 0.1
    n_masked = [3, 0, 9, 1, 5]  # different ratios per crop, one crop unmasked
    masks = np.zeros((n_crops, n_patches), dtype=bool)
    for c, m in enumerate(n_masked):
        masks[c, rng.permutation(n_patches)[:m]] = True
    student_all = rng.normal(size=(n_crops, n_patches, n_protos)) * 2.0
    teacher_all = np.stack(
        [[_softmax_np(rng.normal(size=n_protos) * 2) for _ in range(n_patches)] for _ in range(n_crops)]
    )

    crop_losses = []
    for c in range(n_crops):
        token_ces = [
            -sum(
                teacher_all[c, p, k] * _log_softmax_np(student_all[c, p] / s_temp)[k] for k in range(n_protos)
            )
            for p in range(n_patches)
            if masks[c, p]
        ]
        crop_losses.append(sum(token_ces) / len(token_ces) if token_ces else 0.0)
    expected = sum(crop_losses) / n_crops

    masks_t = torch.from_numpy(masks)
    weights = ibot_masks_weight(masks_t)
    assert weights.shape == (sum(n_masked),)
    student = torch.from_numpy(student_all)[masks_t]  # [M, K]
    teacher = torch.from_numpy(teacher_all)[masks_t]  # [M, K]
    weights64 = ibot_masks_weight(masks_t, dtype=torch.float64)
    got = ibot_loss(student, teacher, weights64, n_crops, s_temp)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    got32 = ibot_loss(student.float(), teacher.float(), weights, n_crops, s_temp)
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_masks_weight_matches_loop() -> None:
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    expected = [1 / 3, 1 / 3, 1 / 3, 1.0]
    assert ibot_masks_weight(masks).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="bool masks"):
        ibot_masks_weight(masks.float())


def test_ibot_loss_no_masked_tokens_keeps_graph() -> None:
    student = torch.randn(0, 8, requires_grad=True)
    loss = ibot_loss(student, torch.zeros(0, 8), torch.zeros(0), n_crops=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 8)


def test_ibot_loss_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ibot_loss(torch.randn(3, 4), torch.rand(3, 5), torch.ones(3), 1)
    with pytest.raises(ValueError, match="masks_weight"):
        ibot_loss(torch.randn(3, 4), torch.rand(3, 4), torch.ones(2), 1)
    with pytest.raises(ValueError, match="n_crops"):
        ibot_loss(torch.randn(3, 4), torch.rand(3, 4), torch.ones(3), 0)


# ----------------------------------------------------------------------------- KoLeo


def test_koleo_matches_brute_force_nearest_neighbours() -> None:
    rng = _rng(2)
    x = rng.normal(size=(33, 12))
    eps = 1e-8
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = cdist(xn, xn)  # [B, B] euclidean
    np.fill_diagonal(d, np.inf)
    expected = -np.mean([math.log(d[i].min() + eps) for i in range(len(x))])

    assert koleo_loss(torch.from_numpy(x), eps).item() == pytest.approx(expected, rel=1e-10)
    # Scale invariance (features are normalised first) and float32 agreement.
    assert koleo_loss(torch.from_numpy(x * 7.0).float(), eps).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_duplicates_are_finite_and_gradient_spreads_points() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-(2 * math.log(1e-8) + math.log(2**0.5)) / 3)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # One gradient step on a clustered cloud increases the nearest-neighbour distances.
    torch.manual_seed(0)
    y = (torch.tensor([[1.0, 0.0, 0.0]]) + 0.05 * torch.randn(16, 3)).requires_grad_(True)
    before = koleo_loss(y)
    before.backward()
    with torch.no_grad():
        after = koleo_loss(y - 0.01 * y.grad)
    assert after.item() < before.item()


def test_koleo_bad_input() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_matches_reference_loops() -> None:
    rng = _rng(3)
    logits = rng.normal(size=(10, 6)) * 2.0
    for n_iters in (1, 3, 5):
        expected = _ref_sinkhorn(logits, 0.1, n_iters)
        got = sinkhorn_knopp(torch.from_numpy(logits), 0.1, n_iters)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
        got32 = sinkhorn_knopp(torch.from_numpy(logits).float(), 0.1, n_iters)
        assert got32.dtype == torch.float32
        np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-4, atol=1e-6)
    # An explicit global row count (iBOT passes the number of masked patches over all ranks).
    got = sinkhorn_knopp(torch.from_numpy(logits), 0.1, 3, n_rows_total=torch.tensor(25))
    np.testing.assert_allclose(got.numpy(), _ref_sinkhorn(logits, 0.1, 3, n_total=25), rtol=1e-9)


def test_sinkhorn_converges_to_doubly_stochastic() -> None:
    torch.manual_seed(0)
    n, k = 48, 12
    logits = torch.randn(n, k) + torch.linspace(-2.0, 2.0, k)  # strongly unbalanced prototypes
    q = sinkhorn_knopp(logits, temp=1.0, n_iters=300)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), n / k), atol=1e-4 * n / k, rtol=0)

    # 3 iterations are already far closer to the uniform prototype marginal than the plain softmax
    # (when logits / temp is not too spread out: with very sharp targets 3 iterations equalise less).
    def marginal_error(p: torch.Tensor) -> float:
        return (p.mean(dim=0) - 1.0 / k).abs().max().item()

    logits = torch.randn(n, k) + torch.linspace(-1.0, 1.0, k)
    err_softmax = marginal_error(torch.softmax(logits / 0.5, dim=-1))
    err_sk3 = marginal_error(sinkhorn_knopp(logits, temp=0.5, n_iters=3))
    assert err_sk3 < 0.1 * err_softmax, (err_sk3, err_softmax)


def test_sinkhorn_stable_at_low_temperature_fp32() -> None:
    # logits / 0.04 spans +-250: exp overflows float32, a single global max-shift underflows whole rows.
    rng = _rng(4)
    logits = rng.uniform(-10.0, 10.0, size=(32, 16))
    logits[:, 3] -= 12.0  # a prototype no sample likes: its whole column is < exp(-88) after a max-shift
    expected = _ref_sinkhorn(logits, 0.04, 3)
    got = sinkhorn_knopp(torch.from_numpy(logits).float(), temp=0.04, n_iters=3)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(32))


def test_sinkhorn_fp32_under_autocast_and_no_grad() -> None:
    logits = torch.randn(8, 5, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        q = sinkhorn_knopp(logits, temp=0.1)
        p = SoftmaxCenter(5).probs(logits, temp=0.1)
    assert q.dtype == torch.float32 and p.dtype == torch.float32
    assert not q.requires_grad and not p.requires_grad
    torch.testing.assert_close(q, sinkhorn_knopp(logits.detach(), temp=0.1))


def test_sinkhorn_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_knopp(torch.randn(2, 3), 0.1, n_iters=0)


# ----------------------------------------------------------------------------- SoftmaxCenter


def test_softmax_center_ema_and_ordering() -> None:
    rng = _rng(5)
    k, momentum, temp = 6, 0.8, 0.07
    center = SoftmaxCenter(k, momentum)
    ref_c = np.zeros(k)
    for step in range(4):
        x = rng.normal(size=(5 + step, k)) * 3.0
        probs = center.probs(torch.from_numpy(x), temp)  # must use the centre of the previous step
        for n in range(x.shape[0]):
            # rtol: the centre buffer is float32
            np.testing.assert_allclose(probs[n].numpy(), _softmax_np((x[n] - ref_c) / temp), rtol=1e-5)
        center.update(torch.from_numpy(x))
        mean = [sum(x[n, j] for n in range(x.shape[0])) / x.shape[0] for j in range(k)]
        ref_c = momentum * ref_c + (1 - momentum) * np.array(mean)
        np.testing.assert_allclose(center.center.numpy()[0], ref_c, rtol=1e-5, atol=1e-6)
    assert "center" in center.state_dict()
    center.update(torch.zeros(0, k))  # an empty batch leaves the centre alone
    np.testing.assert_allclose(center.center.numpy()[0], ref_c, rtol=1e-5, atol=1e-6)


def test_softmax_center_bad_input() -> None:
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(4, momentum=1.5)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SoftmaxCenter(4).probs(torch.randn(3, 5), 0.1)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SoftmaxCenter(4).update(torch.randn(3, 5))


# ----------------------------------------------------------------------------- 2 ranks (gloo)


def _dist_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    logits = torch.randn(12, 10, generator=gen) * 4.0  # [N, K]
    patch_logits = torch.randn(9, 10, generator=gen) * 4.0  # [M, K]
    return logits, patch_logits


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, patch_logits = _dist_batch()
        rows = logits[:7] if rank == 0 else logits[7:]  # unequal halves: 7 and 5 rows
        patches = patch_logits if rank == 0 else patch_logits[:0]  # rank 1 has no masked patch
        center = SoftmaxCenter(10, momentum=0.7)
        center.update(rows)
        center.update(rows * 0.5 + 1.0)
        calls = {"all_reduce": 0, "all_gather": 0}

        def counted(name):
            real = getattr(dist, name)

            def wrapper(*args, **kwargs):
                calls[name] += 1
                return real(*args, **kwargs)
            return wrapper

        with mock.patch.object(dist, "all_reduce", counted("all_reduce")), \
                mock.patch.object(dist, "all_gather", counted("all_gather")):
            sk = sinkhorn_knopp(rows, temp=0.05, n_iters=3)  # gathered: the whole batch fits
            gathered_calls = dict(calls)
            sk_log = sinkhorn_knopp(rows, temp=0.05, n_iters=3, gather_max_bytes=0)  # log domain across ranks
            sk_big = sinkhorn_knopp(rows, temp=0.05, n_iters=3, gather_max_bytes=100)  # counts, then log domain
        out = {
            "sk": sk,
            "sk_log": sk_log,
            "sk_big": sk_big,
            "calls": gathered_calls,
            "sk_empty": sinkhorn_knopp(patches, temp=0.05, n_iters=3, n_rows_total=9),
            "sk_empty_log": sinkhorn_knopp(patches, temp=0.05, n_iters=3, n_rows_total=9, gather_max_bytes=0),
            "center": center.center.clone(),
        }
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    logits, patch_logits = _dist_batch()
    single = sinkhorn_knopp(logits, 0.05, 3)
    for key in ("sk", "sk_log", "sk_big"):  # gathered, log domain across ranks, too big to gather
        torch.testing.assert_close(torch.cat([r0[key], r1[key]]), single, atol=1e-5, rtol=0)
    # the gathered path: one all_gather of the row counts, one of the rows, no all_reduce
    assert r0["calls"] == r1["calls"] == {"all_reduce": 0, "all_gather": 2}
    for key in ("sk_empty", "sk_empty_log"):
        torch.testing.assert_close(r0[key], sinkhorn_knopp(patch_logits, 0.05, 3), atol=1e-5, rtol=0)
        assert r1[key].shape == (0, 10)
    center = SoftmaxCenter(10, momentum=0.7)
    center.update(logits)
    center.update(logits * 0.5 + 1.0)
    for r in (r0, r1):
        torch.testing.assert_close(r["center"], center.center, atol=1e-5, rtol=0)
