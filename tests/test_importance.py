"""Importance maps: normalisation, combination across tasks, and the safetensors store."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from aglcl.attribution import normalize as N
from aglcl.attribution import store as S
from aglcl.errors import AglclError

L0Q, L0U, L1Q = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", \
    "model.layers.1.self_attn.q_proj.weight"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def heavy(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).pow(6) * 1e-3


# ---------------------------------------------------------------- normalize


@pytest.mark.parametrize("method", N.NORMALIZERS)
@pytest.mark.parametrize("scope", N.SCOPES)
def test_normalizers_land_in_unit_interval(method, scope):
    maps = {L0Q: heavy((8, 4)), L0U: heavy((16, 4), 1) * 100, L1Q: heavy((8, 4), 2), "lm_head.weight": heavy((3, 5))}
    out = N.normalize(maps, method, scope)
    assert list(out) == list(maps)
    for name, t in out.items():
        assert t.dtype == torch.float32 and t.shape == maps[name].shape
        assert t.min() >= 0 and t.max() <= 1


def test_minmax_and_rank_preserve_order():
    x = torch.tensor([[0.5, 0.0, 3.0], [10.0, 1e-8, 2.0]])
    for method in ("minmax", "rank"):
        y = N.normalize({"w": x}, method)["w"].reshape(-1)
        order = torch.argsort(x.reshape(-1))
        assert torch.all(y[order][1:] > y[order][:-1]), method
        assert y.min() == 0 and y.max() == 1
    rank = N.normalize({"w": x}, "rank")["w"]
    assert torch.allclose(rank, torch.tensor([[2, 0, 4], [5, 1, 3]]) / 5.0)


def test_rank_ties_get_the_minimum_rank():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
    y = N.normalize({"w": x}, "rank")["w"]
    assert torch.allclose(y, torch.tensor([0, 0, 0, 3, 4, 4, 6]) / 6.0)
    assert torch.equal(N.normalize({"w": torch.full((4,), 3.0)}, "rank")["w"], torch.zeros(4))
    assert torch.equal(N.normalize({"w": torch.ones(1)}, "rank")["w"], torch.zeros(1))


def test_rank_is_loop_free_on_a_large_group():
    perm = torch.randperm(2_000_000, generator=torch.Generator().manual_seed(0))
    y = N.normalize({"w": perm.float().mul_(1e-6).reshape(1000, 2000)}, "rank")["w"]  # distinct values
    assert torch.equal(y.reshape(-1), perm.float() / (perm.numel() - 1))


def test_constant_groups_and_ztanh():
    for method in N.NORMALIZERS:
        assert torch.equal(N.normalize({"w": torch.full((3, 2), 7.0)}, method)["w"], torch.zeros(3, 2))
    x = torch.tensor([1.0, 3.0])  # mean 2, population std 1
    y = N.normalize({"w": x}, "ztanh")["w"]
    assert torch.allclose(y, torch.tanh(torch.tensor([1.0, 1.0])))
    assert torch.allclose(N.normalize({"w": torch.tensor([0.0, 1.0])}, "minmax")["w"], torch.tensor([0.0, 1.0]))


def test_block_scope_groups_tensors_of_one_layer():
    maps = {L0Q: torch.tensor([1.0, 2.0]), L0U: torch.tensor([3.0, 4.0]), L1Q: torch.tensor([100.0, 200.0]),
            "transformer.h.2.attn.c_attn.weight": torch.tensor([5.0, 6.0]),
            "transformer.h.2.mlp.c_fc.weight": torch.tensor([7.0, 9.0]), "lm_head.weight": torch.tensor([1.0, 9.0])}
    out = N.normalize(maps, "minmax", "block")
    assert torch.allclose(out[L0Q], torch.tensor([0.0, 1 / 3]))
    assert torch.allclose(out[L0U], torch.tensor([2 / 3, 1.0]))
    assert torch.allclose(out[L1Q], torch.tensor([0.0, 1.0]))  # its own block
    assert torch.allclose(out["transformer.h.2.mlp.c_fc.weight"], torch.tensor([0.5, 1.0]))
    assert torch.allclose(out["lm_head.weight"], torch.tensor([0.0, 1.0]))  # outside blocks: alone
    per_tensor = N.normalize(maps, "minmax", "tensor")
    assert torch.allclose(per_tensor[L0Q], torch.tensor([0.0, 1.0]))
    assert N.block_key("model.layers.11.mlp.down_proj.weight") == "model.layers.11."
    assert N.block_key("model.embed_tokens.weight") == "model.embed_tokens.weight"


@pytest.mark.parametrize(("kwargs", "key", "choice"), [({"method": "max"}, "attribution.normalize", "'rank'"),
                                                       ({"scope": "layer"}, "attribution.scope", "'block'")])
def test_normalize_rejects_unknown_options(kwargs, key, choice):
    with pytest.raises(AglclError) as exc:
        N.normalize({"w": torch.ones(2)}, **kwargs)
    msg = one_line(exc)
    assert key in msg and choice in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_normalize_rejects_non_finite(bad):
    with pytest.raises(AglclError) as exc:
        N.normalize({"ok": torch.ones(2), L0Q: torch.tensor([1.0, bad])})
    assert L0Q in one_line(exc)


# ---------------------------------------------------------------- combine


def test_combine_rules_on_hand_examples():
    prev = {"a": torch.tensor([0.2, 0.8]), "b": torch.tensor([[0.0, 1.0]])}
    new = {"a": torch.tensor([0.6, 0.4]), "b": torch.tensor([[0.5, 0.5]])}
    mx = N.combine(prev, new, "max")
    assert torch.allclose(mx["a"], torch.tensor([0.6, 0.8])) and torch.allclose(mx["b"], torch.tensor([[0.5, 1.0]]))
    ema = N.combine(prev, new, "ema", ema_decay=0.75)
    assert torch.allclose(ema["a"], torch.tensor([0.3, 0.7]))
    sm = N.combine(prev, new, "sum")
    assert torch.allclose(sm["a"], torch.tensor([0.8, 1.2]) / 1.2)
    assert torch.allclose(sm["b"], torch.tensor([[0.5, 1.5]]) / 1.5)
    assert torch.equal(N.combine({"z": torch.zeros(2)}, {"z": torch.zeros(2)}, "sum")["z"], torch.zeros(2))
    assert torch.equal(prev["a"], torch.tensor([0.2, 0.8]))  # inputs untouched


def test_combine_first_task_copies_and_memory_stays_constant():
    new = {"a": torch.rand(3, 4), "b": torch.rand(5)}
    first = N.combine(None, new, "max")
    assert torch.equal(first["a"], new["a"]) and first["a"].data_ptr() != new["a"].data_ptr()
    running = first
    for t in range(5):
        running = N.combine(running, {k: torch.rand(v.shape) for k, v in new.items()}, "ema", count=t + 1)
        assert list(running) == list(new) and all(running[k].shape == new[k].shape for k in new)


def test_combine_mismatches_and_bad_options():
    prev = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(AglclError) as exc:
        N.combine(prev, {"a": torch.zeros(2)})
    assert "'b'" in one_line(exc)
    with pytest.raises(AglclError) as exc:
        N.combine(prev, {"a": torch.zeros(2), "b": torch.zeros(4)})
    assert "'b'" in one_line(exc) and "(3,)" in str(exc.value) and "(4,)" in str(exc.value)
    with pytest.raises(AglclError) as exc:
        N.combine(prev, prev, how="mean")
    assert "attribution.combine" in one_line(exc) and "'max'" in str(exc.value)
    with pytest.raises(AglclError, match="attribution.ema_decay"):
        N.combine(prev, prev, how="ema", ema_decay=1.5)
    with pytest.raises(AglclError, match="'b'"):
        N.combine(prev, {"a": torch.zeros(2), "b": torch.tensor([0.0, float("nan"), 0.0])})


# ---------------------------------------------------------------- store


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(1)
    return {L0Q: torch.rand(6, 4, generator=g), "lm_head.weight": torch.rand(5, generator=g),
            "model.norm.weight": torch.tensor(0.25)}


def test_paths(tmp_path):
    assert S.task_map_path(tmp_path, 2, "sst2") == tmp_path / "importance" / "task_2_sst2.safetensors"
    assert S.combined_path(tmp_path) == tmp_path / "importance" / "combined.safetensors"
    with pytest.raises(ValueError):
        S.task_map_path(tmp_path, 0, "x")


def test_names_hash_is_order_free_and_shape_aware(maps):
    shapes = {n: tuple(t.shape) for n, t in reversed(maps.items())}
    h = S.names_hash(maps)
    assert h == S.names_hash(shapes) and len(h) == 16 and int(h, 16) >= 0
    assert h != S.names_hash({**shapes, L0Q: (4, 6)})


@pytest.mark.parametrize(("dtype", "stored", "tol"), [("float32", torch.float32, 0.0),
                                                       ("bfloat16", torch.bfloat16, 2**-8),
                                                       ("uint8", torch.uint8, 1 / 510)])
def test_round_trip_all_dtypes(tmp_path, maps, dtype, stored, tol):
    path = S.task_map_path(tmp_path, 1, "t1")
    meta = {"estimator": "GradXWeight", "normalize": "rank", "scope": "tensor", "task": "t1", "extra": "7"}
    S.save_map(path, maps, dtype=dtype, metadata=meta)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    raw = safetensors.torch.load_file(path)
    assert all(t.dtype == stored for t in raw.values())
    back, got = S.load_map(path, expect={n: tuple(t.shape) for n, t in maps.items()})
    assert {k: got[k] for k in meta} == meta
    assert got["dtype"] == dtype and got["names_hash"] == S.names_hash(maps)
    assert ("scale" in got) == (dtype == "uint8")
    for n, t in maps.items():
        assert back[n].dtype == torch.float32 and back[n].shape == t.shape
        assert (back[n] - t).abs().max() <= tol * max(1.0, t.abs().max().item())


def test_uint8_error_bound(tmp_path):
    x = {"w": torch.rand(100_000, generator=torch.Generator().manual_seed(3))}
    x["w"][:2] = torch.tensor([0.0, 1.0])
    S.save_map(tmp_path / "m.safetensors", x, dtype="uint8", metadata={})
    back, meta = S.load_map(tmp_path / "m.safetensors")
    assert (back["w"] - x["w"]).abs().max() <= 1 / 510 + 1e-7
    assert back["w"][0] == 0 and back["w"][1] == 1 and float(meta["scale"]) == pytest.approx(1 / 255)


def test_uint8_refuses_unnormalised_and_unknown_dtype(tmp_path):
    with pytest.raises(AglclError) as exc:
        S.save_map(tmp_path / "m.safetensors", {L0Q: torch.tensor([0.5, 1.5])}, dtype="uint8", metadata={})
    assert "normalise first" in one_line(exc) and L0Q in str(exc.value)
    with pytest.raises(AglclError, match="'float32'"):
        S.save_map(tmp_path / "m.safetensors", {"w": torch.ones(1)}, dtype="float16", metadata={})
    with pytest.raises(AglclError, match=L0Q):
        S.save_map(tmp_path / "m.safetensors", {L0Q: torch.tensor([float("inf")])}, metadata={})
    assert not any(tmp_path.iterdir())


def test_shared_storage_is_saved(tmp_path):
    w = torch.rand(4, 3)
    S.save_map(tmp_path / "m.safetensors", {"embed.weight": w, "lm_head.weight": w, "half": w[:2]}, metadata={})
    back, _ = S.load_map(tmp_path / "m.safetensors")
    assert torch.equal(back["lm_head.weight"], w) and torch.equal(back["half"], w[:2])


def test_missing_and_truncated_files(tmp_path, maps):
    with pytest.raises(AglclError, match="not found"):
        S.load_map(tmp_path / "nope.safetensors")
    path = tmp_path / "m.safetensors"
    S.save_map(path, maps, metadata={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AglclError) as exc:
        S.load_map(path)
    assert str(path) in one_line(exc) and "corrupt" in str(exc.value)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(AglclError, match="corrupt"):
        S.load_map(path)


def test_load_refuses_wrong_names_shapes_and_hash(tmp_path, maps):
    path = tmp_path / "m.safetensors"
    S.save_map(path, maps, dtype="uint8", metadata={})
    shapes = {n: tuple(t.shape) for n, t in maps.items()}
    with pytest.raises(AglclError) as exc:
        S.load_map(path, expect={**shapes, "model.layers.9.mlp.up_proj.weight": (2, 2)})
    msg = one_line(exc)
    assert "1 parameter(s) missing, 0 extra" in msg and "model.layers.9.mlp.up_proj.weight" in msg
    del shapes["lm_head.weight"]
    with pytest.raises(AglclError, match="0 parameter.s. missing, 1 extra .*lm_head.weight"):
        S.load_map(path, expect=shapes)
    with pytest.raises(AglclError) as exc:
        S.load_map(path, expect={n: tuple(t.shape) for n, t in maps.items()} | {L0Q: (4, 6)})
    assert L0Q in one_line(exc) and "(6, 4)" in str(exc.value) and "(4, 6)" in str(exc.value)
    # a file whose recorded names_hash does not match its tensors
    raw = safetensors.torch.load_file(path)
    safetensors.torch.save_file(raw, path, metadata={"names_hash": "0" * 16, "dtype": "uint8"})
    with pytest.raises(AglclError) as exc:
        S.load_map(path, expect={n: tuple(t.shape) for n, t in maps.items()})
    assert "names_hash" in one_line(exc)


def test_load_refuses_non_finite(tmp_path):
    safetensors.torch.save_file({L0Q: torch.tensor([0.0, float("nan")])}, tmp_path / "m.safetensors")
    with pytest.raises(AglclError) as exc:
        S.load_map(tmp_path / "m.safetensors")
    assert L0Q in one_line(exc)


# ---------------------------------------------------------------- reports


def test_summarize_on_hand_built_maps():
    rows = S.summarize({"w": torch.arange(101, dtype=torch.float32) / 100, "e": torch.zeros(0)})
    w = rows[0]
    assert w["name"] == "w" and w["numel"] == 101
    assert w["mean"] == pytest.approx(0.5) and w["p50"] == pytest.approx(0.5)
    assert w["p90"] == pytest.approx(0.9) and w["p99"] == pytest.approx(0.99)
    assert w["frac_above_0.5"] == pytest.approx(50 / 101)
    assert rows[1]["numel"] == 0
    big = S.summarize({"b": torch.rand(2_000_000, generator=torch.Generator().manual_seed(0))})[0]
    assert big["p90"] == pytest.approx(0.9, abs=5e-3)
    assert S.summarize({"b": torch.rand(2_000_000, generator=torch.Generator().manual_seed(0))})[0] == big


def test_top_overlap_on_hand_built_maps():
    a = {"x": torch.arange(100, dtype=torch.float32), "y": torch.arange(100, 200, dtype=torch.float32)}
    assert S.top_overlap(a, a, 0.05) == 1.0
    rev = {k: -v for k, v in a.items()}
    assert S.top_overlap(a, rev, 0.05) == 0.0
    half = {"x": a["x"], "y": torch.cat([a["y"][:95], -a["y"][95:]])}  # b's top-10 is y[85:95]
    assert S.top_overlap(a, half, 0.05) == pytest.approx(0.5)
    assert S.top_overlap(a, {"y": a["y"], "z": torch.ones(3)}, 0.1) == 1.0  # only shared tensors count
    with pytest.raises(AglclError, match="share no parameter"):
        S.top_overlap(a, {"z": torch.ones(3)})
    with pytest.raises(AglclError, match="p="):
        S.top_overlap(a, a, 0.0)


# -- the O(n) rank ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lognormal", "zero-block", "ties", "pareto", "narrow", "signed", "small"])
def test_fast_rank_is_within_the_uint8_step_of_the_exact_rank(kind):
    from aglcl.attribution.normalize import FAST_MIN, _rank, _rank_fast

    g = torch.Generator().manual_seed(1)
    n = 3 * FAST_MIN + 7
    x = {"lognormal": lambda: torch.randn(n, generator=g).mul(2).exp(),
         "zero-block": lambda: torch.cat([torch.zeros(n // 3), torch.rand(n - n // 3, generator=g)]),
         "ties": lambda: torch.randint(0, 40, (n,), generator=g).float(),
         "pareto": lambda: torch.rand(n, generator=g).clamp_(min=1e-9).pow_(-2.0),
         "narrow": lambda: torch.randn(n, generator=g).mul(0.01).add(1.0),  # many heavy buckets: resolved by a sort
         "signed": lambda: torch.cat([torch.randn(n - 99, generator=g), torch.zeros(50), -torch.zeros(49)]),
         "small": lambda: torch.rand(FAST_MIN - 1, generator=g)}[kind]()
    exact, fast = _rank(x), _rank_fast(x)
    assert float((exact - fast).abs().max()) <= 1 / 1023
    assert torch.equal(fast, _rank_fast(x.clone()))  # deterministic: a recomputed map is the same map
    if kind == "zero-block":
        assert float(fast[: n // 3].max()) == 0.0  # exact zeros keep no protection
    if kind == "signed":
        assert torch.equal(fast[x == 0], exact[x == 0])  # -0.0 ties with +0.0
    if kind in ("ties", "small"):
        assert torch.equal(fast, exact)  # ties sit on cell edges; small tensors are ranked exactly


def test_the_pipeline_ranks_exactly_when_asked():
    from aglcl.attribution import normalize as norm

    g = torch.Generator().manual_seed(2)
    maps = {"a.weight": torch.randn(300, 300, generator=g).exp()}
    exact = norm.normalize(maps, "rank", "tensor", exact=True)["a.weight"]
    fast = norm.normalize(maps, "rank", "tensor", exact=False)["a.weight"]
    block = norm.normalize(maps, "rank", "block", exact=False)["a.weight"]
    assert not torch.equal(exact, fast) and float((exact - fast).abs().max()) <= 1 / 255
    assert torch.equal(fast, block)  # one tensor in its own group: the same ranks
