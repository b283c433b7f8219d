import pytest
import torch

from salun_diffusers.masking import (MaskedAdamW, MaskedUpdate, load_mask, mask_density, mask_from_saliency, pack_mask,
                                     save_mask, unpack_mask)


def _saliency(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.rand(64, 33, generator=g), "b1": torch.rand(33, generator=g), "zero": torch.zeros(50),
            "ties": torch.randint(0, 3, (40,), generator=g).float()}


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_global_mask_selects_exactly_the_top_k(ratio):
    sal = _saliency()
    mask = mask_from_saliency(sal, ratio)
    flat = torch.cat([sal[n].flatten() for n in sorted(sal)])
    chosen = torch.cat([mask[n].flatten() for n in sorted(sal)])
    k = round(ratio * flat.numel())
    assert int(chosen.sum()) == k
    kth = flat.sort(descending=True).values[k - 1]
    assert bool((flat[chosen] >= kth).all()) and bool((flat[~chosen] <= kth).all())
    assert abs(mask_density(mask) - k / flat.numel()) < 1e-12


def _sharded_top_k(named, k, world):
    """``_top_k_shards`` run by ``world`` threads standing for processes, each with its dim-0 shard of every tensor
    (FSDP2's: ceil(rows / world) rows each, the last ones fewer or none) and an all-reduce that sums over the threads;
    ``k``: an int (over all tensors) or name -> k (per tensor). Returns the whole masks (each tensor's shards
    concatenated in rank order) and the all-reduce count per process."""
    import threading

    from salun_diffusers.masking import _top_k_shards

    names = sorted(named)
    ks = k if isinstance(k, int) else [k[n] for n in names]
    # no abort on an error: a thread that raises after the last collective must not break the others' release from
    # it (Barrier.abort races with their wake-up); one left waiting for a peer that raised times out instead
    barrier, parts, calls = threading.Barrier(world, timeout=60), [None] * world, [0] * world
    out, errors = [None] * world, []

    def shard(t, rank):
        rows = -(-t.shape[0] // world)
        return t[rank * rows:(rank + 1) * rows].reshape(-1)

    def run(rank):
        def all_reduce(t):
            calls[rank] += 1
            parts[rank] = t.clone()
            barrier.wait()
            total = sum(parts)
            barrier.wait()  # every thread has summed before any writes its next part
            t.copy_(total)
        try:
            out[rank] = _top_k_shards([shard(named[n], rank) for n in names], ks, rank, world, all_reduce)
        except Exception as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:  # every process raises alike, none left waiting
        assert len(errors) == world and len({type(e) for e in errors}) == 1, errors
        raise errors[0]
    return {n: torch.cat([out[r][j] for r in range(world)]).view(named[n].shape) for j, n in enumerate(names)}, calls


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 0.99])
def test_sharded_top_k_selects_what_one_process_selects(world, ratio):
    """The distributed top-k (a bisection over the float32 bit patterns, counts all-reduced; ties taken in name, rank,
    then flat order) selects exactly the entries the one-process selection does, ties included: a tensor of a few
    repeated values, one of zeros, one with fewer rows than processes (an empty shard), and a tie mass at the
    threshold spread over several tensors and processes, and a threshold of 0. At most 34 all-reduces per process
    (the check, 31 or 32 bisection rounds, the tie table), the same in every process."""
    from salun_diffusers.masking import _select_top_k

    sal = dict(_saliency(), one_row=torch.tensor([[2.0, 1.0, 2.0]]), more_ties=torch.full((7, 3), 1.0),
               negative_zeros=torch.tensor([[-0.0, 0.0], [-0.0, 1.0]]))  # -0.0 is a zero (its sign bit is set)
    k = round(ratio * sum(t.numel() for t in sal.values()))
    want = _select_top_k(sal, k)
    got, calls = _sharded_top_k(sal, k, world)
    assert all(torch.equal(got[n], want[n]) for n in sal), [n for n in sal if not torch.equal(got[n], want[n])]
    assert sum(int(m.sum()) for m in got.values()) == k
    assert len(set(calls)) == 1 and calls[0] <= 34, calls  # the same collectives in every process, a fixed few


def _many_ties(count=20, seed=1):
    """``count`` tensors of few distinct values (many equal, zeros among them), of 1 to 9 rows (fewer rows than
    processes: empty shards) and a few shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        shape = (1 + i % 9,) + ((3,) if i % 3 else (2, 2)) if i % 4 else (1 + i % 9,)
        out[f"t{i:02d}"] = torch.randint(0, 1 + i % 4, shape, generator=g).float() * 0.5
    out["t00"] = torch.zeros(5, 3)  # all zeros: a threshold of 0
    out["t01"] = torch.full((4, 3), 2.0)  # all one value
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_top_k_per_tensor_selects_what_one_process_selects(world):
    """Each tensor's own top-k (``--mask_scope layer``), every tensor searched at once: exactly the entries the
    one-process ``_select_top_k`` of that tensor alone selects, ties (rank order, then flat index) included, with k
    of 1, of its size, and in between, on 20 tensors of few values and zeros, some with fewer rows than processes.
    The all-reduces per process do not grow with the number of tensors: at most 34 for 20 tensors, as for one."""
    from salun_diffusers.masking import _select_top_k

    sal = dict(_many_ties(), w=torch.rand(7, 5, generator=torch.Generator().manual_seed(2)))
    sizes = [1, None, 0.3, 0.5, 0.9]  # 1, the whole tensor, a share of it
    k = {}
    for i, n in enumerate(sorted(sal)):
        size = sizes[i % len(sizes)]
        k[n] = 1 if size == 1 else sal[n].numel() if size is None else max(1, round(size * sal[n].numel()))
    got, calls = _sharded_top_k(sal, k, world)
    for n, s in sal.items():
        assert torch.equal(got[n], _select_top_k({n: s}, k[n])[n]), (n, k[n])
        assert int(got[n].sum()) == k[n], n
    assert len(set(calls)) == 1 and calls[0] <= 34, calls
    _, one = _sharded_top_k({"w": sal["w"]}, {"w": k["w"]}, world)
    assert one[0] <= 34, one
    print(f"{world} process(es): {calls[0]} all-reduces for {len(sal)} tensors' top-k, {one[0]} for one")


def test_sharded_top_k_refuses_a_negative_saliency_in_every_process():
    """A negative entry in one process's shard is refused by all of them (the check's count is all-reduced), so no
    process waits on the others."""
    sal = {"a": torch.rand(4, 3), "b": torch.rand(6)}
    sal["b"][5] = -1.0  # in the last process's shard
    with pytest.raises(ValueError, match="non-negative"):
        _sharded_top_k(sal, 3, 2)


def test_layer_scope_selects_the_ratio_in_every_tensor():
    sal = _saliency()
    mask = mask_from_saliency(sal, 0.25, scope="layer")
    for name, m in mask.items():
        assert int(m.sum()) == max(1, round(0.25 * m.numel())), name
        assert m.shape == sal[name].shape


def test_ties_are_broken_deterministically():
    sal = {"a": torch.ones(10), "b": torch.ones(10)}
    m1, m2 = mask_from_saliency(sal, 0.5), mask_from_saliency(sal, 0.5)
    assert all(torch.equal(m1[n], m2[n]) for n in sal)
    assert int(m1["a"].sum()) == 10 and int(m1["b"].sum()) == 0  # name order, then index


def test_large_tensor_threshold_is_exact_beyond_quantile_limit():
    x = torch.rand(2 ** 24 + 1000, generator=torch.Generator().manual_seed(1))  # torch.quantile refuses this size
    k = round(0.37 * x.numel())
    mask = mask_from_saliency({"x": x}, 0.37)["x"]
    assert int(mask.sum()) == k
    assert float(x[mask].min()) >= float(torch.topk(x, k).values[-1])


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        mask_from_saliency(_saliency(), ratio)


def test_nan_saliency_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        mask_from_saliency({"a": torch.tensor([1.0, float("nan")])}, 0.5)


def test_pack_roundtrip_and_file(tmp_path):
    mask = mask_from_saliency(_saliency(3), 0.4)
    shapes = {n: m.shape for n, m in mask.items()}
    unpacked = unpack_mask(pack_mask(mask), shapes)
    assert all(torch.equal(unpacked[n], mask[n]) for n in mask)
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path, {"concept": "nudity"})
    loaded, meta = load_mask(path)
    assert meta["concept"] == "nudity" and float(meta["density"]) == pytest.approx(mask_density(mask), abs=1e-6)
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)
    # packed bits: ~1 bit per weight
    assert (tmp_path / "mask.safetensors").stat().st_size < sum(m.numel() for m in mask.values()) / 8 + 2000


def test_corrupt_mask_file_is_rejected(tmp_path):
    path = tmp_path / "mask.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        load_mask(str(path))
    with pytest.raises(FileNotFoundError, match="no mask file"):
        load_mask(str(tmp_path / "missing.safetensors"))


def test_masked_update_keeps_outside_weights_bit_identical_with_weight_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sal = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    mask = mask_from_saliency(sal, 0.3)
    guard = MaskedUpdate(model, mask)
    opt = torch.optim.AdamW(guard.trainable_parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(5):
        loss = model(torch.randn(32, 8)).pow(2).mean()
        loss.backward()
        guard.mask_gradients()
        opt.step()
        opt.zero_grad()
        guard.restore()
    changed = 0
    for n, p in model.named_parameters():
        m = mask[n]
        assert torch.equal(p.detach()[~m], base[n][~m]), n  # bit-identical outside the mask
        changed += int((p.detach()[m] != base[n][m]).sum())
    assert changed > 0.9 * sum(int(m.sum()) for m in mask.values())


def test_masked_update_by_index_and_by_boolean_mask_are_bit_identical(monkeypatch):
    """Small models gather / scatter by kept index positions, large ones by the boolean mask: same entries, same
    order, so the same weights bit for bit."""
    from salun_diffusers import masking

    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        mask = mask_from_saliency({n: torch.rand_like(p) for n, p in model.named_parameters()}, 0.4)
        guard = MaskedUpdate(model, mask)
        opt = torch.optim.AdamW(guard.trainable_parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(4):
            model(torch.randn(2, 3, 9, 9)).pow(2).mean().backward()
            guard.mask_gradients()
            opt.step()
            opt.zero_grad()
            guard.restore()
        for n, p in model.named_parameters():
            assert torch.equal(p.detach()[~mask[n]], base[n][~mask[n]]), n
        return guard, {n: p.detach().clone() for n, p in model.named_parameters()}

    by_index, a = run()
    monkeypatch.setattr(masking, "INDEX_MAX_ENTRIES", 0)
    by_mask, b = run()
    assert by_index.index is not None and by_mask.index is None
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("hooks", [True, False, "in_backward"])
def test_masked_update_matches_dense_adamw_with_state_sized_by_the_mask(hooks):
    """Same masked values as AdamW over whole tensors with gradients zeroed outside the mask (the old way), while
    the optimizer state holds only the masked entries and no full-size gradient outlives backward; the same for
    MaskedAdamW, which steps inside backward (``--optimizer_in_backward``)."""
    def model_and_mask():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        sal = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in model.named_parameters()}
        return model, mask_from_saliency(sal, 0.3)

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    dense, mask = model_and_mask()
    base = {n: p.detach().clone() for n, p in dense.named_parameters()}
    opt = torch.optim.AdamW(dense.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        dense(x).pow(2).mean().backward()
        for n, p in dense.named_parameters():
            p.grad.mul_(mask[n])
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, p in dense.named_parameters():
                p[~mask[n]] = base[n][~mask[n]]
    model, mask = model_and_mask()
    if hooks == "in_backward":
        guard = opt = MaskedAdamW(model, mask, lr=0.1, weight_decay=0.5)
    else:
        guard = MaskedUpdate(model, mask, hooks=hooks)
        opt = torch.optim.AdamW(guard.trainable_parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        if hooks:
            assert all(p.grad is None for p in model.parameters())  # gathered and dropped during backward
        guard.mask_gradients()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
        guard.restore()
    a, b = dict(dense.named_parameters()), dict(model.named_parameters())
    # the same elementwise AdamW arithmetic on the same gradients (dense, or gathered into flat masked values): the
    # kernels may round differently, a few float32 ulps of the weight and its update per step (lr 0.1, 3 steps)
    tol = 3 * 4 * torch.finfo(torch.float32).eps * (max(float(p.detach().abs().max()) for p in a.values()) + 0.1)
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=tol) for n in a)
    assert all(torch.equal(b[n].detach()[~mask[n]], base[n][~mask[n]]) for n in b)
    state = sum(t.numel() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    assert state == 2 * sum(int(m.sum()) for m in mask.values())  # exp_avg + exp_avg_sq of masked entries only
    if hooks == "in_backward":
        return
    guard.reload()  # after loading weights: the flat values follow the model
    assert all(torch.equal(guard.values[n].detach(), b[n].detach()[mask[n]]) for n in guard.values)


def test_masked_adamw_checks_every_gathered_gradient_before_applying_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    mask = {n: torch.arange(p.numel()).view(p.shape) % 2 == 0 for n, p in model.named_parameters()}
    seen = []

    def check(name, grad):
        seen.append(name)
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(name)

    opt = MaskedAdamW(model, mask, lr=0.1, check=check)
    model(torch.randn(2, 4)).sum().backward()
    assert sorted(seen) == sorted(opt.params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError):
        model(torch.full((2, 4), float("nan"))).sum().backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the non-finite gradient was never applied
    assert torch.equal(before["1.weight"], model[1].weight.detach())


def test_masked_update_rejects_a_foreign_mask():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="different model"):
        MaskedUpdate(model, {"other.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        MaskedUpdate(model, {"weight": torch.ones(2, 3, dtype=torch.bool)})


@pytest.mark.parametrize("sample_size", [1, 7, 1000, 1 << 21])
@pytest.mark.parametrize("kind", ["uniform", "ties", "zeros"])
def test_kth_largest_is_exact_for_any_sample(sample_size, kind):
    """The sample only brackets the threshold; counting passes make it exact (tiny samples force retries)."""
    from salun_diffusers.masking import _kth_largest

    g = torch.Generator().manual_seed(2)
    if kind == "uniform":
        parts = [torch.rand(3000, generator=g), torch.rand(17, generator=g) * 2, torch.rand(5000, generator=g)]
    elif kind == "ties":
        parts = [torch.randint(0, 4, (3000,), generator=g).float(), torch.randint(0, 4, (900,), generator=g).float()]
    else:  # most saliency values exactly zero (unused weights), as in real U-Nets
        parts = [torch.zeros(6000), torch.rand(500, generator=g), torch.zeros(10)]
    flat = torch.cat(parts)
    ordered = flat.sort(descending=True).values
    for k in (1, 2, 17, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        assert _kth_largest(parts, k, sample_size=sample_size) == float(ordered[k - 1]), (k, kind)
