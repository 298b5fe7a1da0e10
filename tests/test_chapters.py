"""Mixture of Chapters: causality, routing, aux losses, retrofit, save/load, decoding, continual use."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model
from slotwise.chapters import ChapterMemory, RoutingCache, route, router_losses
from slotwise.checkpoint import load_checkpoint, read_retrofit_config, save_checkpoint
from slotwise.kernels import chapter_accesses, chapter_attention_reference
from slotwise.memory import ChapterConfig, MemoryConfig
from slotwise.retrofit import RetrofitConfig, memory_disabled, memory_layers, record_lookups, retrofit

V = TINY["vocab_size"]


def moc_cfg(routing="causal_chunks", out_init_std=0.1, shared_values=True, layers=(1, 3), **chapters) -> RetrofitConfig:
    ch = dict(n_chapters=6, chapter_tokens=5, top_c=2, routing=routing, chunk_len=4, access_k=3)
    ch.update(chapters)
    return RetrofitConfig(layers=list(layers), memory=MemoryConfig(kind="chapters", heads=2, out_init_std=out_init_std,
                                                                   shared_values=shared_values, chapters=ChapterConfig(**ch)))


def moc_model(routing="causal_chunks", seed=0, **kw):
    model = retrofit(tiny_model("llama", seed), moc_cfg(routing, **kw)).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking router: distinct chapters for distinct prefixes
        for mem in memory_layers(model).values():
            mem.router.weight.normal_(std=1.0)
    return model


def _tokens(seed=0, shape=(2, 19)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- causality


@torch.no_grad()
def test_causal_chunks_never_see_the_future():
    """Changing any token after t leaves the logits at positions <= t bitwise unchanged."""
    model = moc_model("causal_chunks")
    ids = _tokens()
    base = model(ids).logits
    with memory_disabled(model):
        assert not torch.equal(model(ids).logits, base)  # the memory matters, so the test can fail
    for t in (0, 2, 3, 4, 7, 8, 13, 17):  # inside chunks and on their boundaries (chunk_len 4)
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, V, changed[:, t + 1:].shape, generator=torch.Generator().manual_seed(t))
        logits = model(changed).logits
        assert torch.equal(logits[:, :t + 1], base[:, :t + 1]), f"position <= {t} saw a later token"
        assert not torch.equal(logits[:, t + 1:], base[:, t + 1:])


@torch.no_grad()
def test_sequence_routing_leaks_the_future():
    """The paper's routing: a change after t moves the logits before it (the option is labelled LEAKY)."""
    model = moc_model("sequence")
    ids = _tokens()
    base = model(ids).logits
    for t in (0, 4, 13):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, V, changed[:, t + 1:].shape, generator=torch.Generator().manual_seed(t))
        logits = model(changed).logits
        assert not torch.equal(logits[:, :t + 1], base[:, :t + 1])
        assert (logits[:, 0] - base[:, 0]).abs().max() > 1e-6  # even the first position


# ----------------------------------------------------------------------------- routing


def _brute_force_routes(x, router, cfg):
    """Per sequence and chunk, by loops: (segments [(start, end)], chapters, weights) in flat token order."""
    c = cfg.chapters
    B, S, _ = x.shape
    segs, chapters, weights = [], [], []
    for b in range(B):
        if c.routing == "sequence":
            spans = [(0, S, x[b].double().mean(0))]
        else:
            spans = [(s, min(s + c.chunk_len, S), x[b, :s].double().mean(0) if s else None) for s in range(0, S, c.chunk_len)]
        for s, e, pooled in spans:
            segs.append((b * S + s, b * S + e))
            chosen, w = [], []
            if pooled is not None:
                p = F.softmax(pooled @ router.weight.double().T + router.bias.double(), -1)
                order = sorted(range(c.n_chapters), key=lambda i: -p[i].item())[:c.top_c]
                chosen = order
                w = [p[i].item() / sum(p[j].item() for j in order) for i in order]
            else:
                chosen, w = [-1] * c.top_c, [0.0] * c.top_c
            chapters.append(([c.n_chapters] if c.shared_chapter else []) + chosen)
            weights.append(([1.0] if c.shared_chapter else []) + w)
    return segs, chapters, weights


@pytest.mark.parametrize("routing,S,chunk_len,shared", [("causal_chunks", 13, 4, True), ("causal_chunks", 8, 4, True),
                                                         ("causal_chunks", 3, 5, True), ("sequence", 11, 4, True),
                                                         ("sequence", 11, 4, False)])
def test_chapter_selection_matches_brute_force(routing, S, chunk_len, shared):
    cfg = moc_cfg(routing, chunk_len=chunk_len, shared_chapter=shared).memory
    torch.manual_seed(3)
    router = torch.nn.Linear(16, cfg.chapters.n_chapters)
    x = torch.randn(3, S, 16)
    r = route(x, router, cfg)
    segs, chapters, weights = _brute_force_routes(x, router, cfg)
    assert r.offsets.tolist() == [s for s, _ in segs] + [segs[-1][1]]
    assert r.chapters.tolist() == chapters
    torch.testing.assert_close(r.weights.double(), torch.tensor(weights, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert r.max_seg_len == max(e - s for s, e in segs)
    routed = [row for row in chapters if row[-1] != -1]
    assert r.logits.shape == (len(routed), cfg.chapters.n_chapters)


def test_routing_continues_from_a_cache_exactly():
    """Routing tokens in pieces (prefill then one at a time) gives each token the chapters of a full pass."""
    cfg = moc_cfg("causal_chunks", chunk_len=3).memory
    torch.manual_seed(4)
    router = torch.nn.Linear(16, cfg.chapters.n_chapters)
    x = torch.randn(2, 11, 16)
    full = route(x, router, cfg)
    seg_of = lambda r, T: torch.repeat_interleave(torch.arange(len(r.offsets) - 1), r.offsets.diff(), output_size=T)  # noqa: E731
    want = full.chapters[seg_of(full, 22)].view(2, 11, -1)
    cache, got = RoutingCache(), []
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 11)):
        r = route(x[:, a:b], router, cfg, cache)
        cache.n, cache.total, cache.boundary = r.state.n, r.state.total, r.state.boundary
        got.append(r.chapters[seg_of(r, 2 * (b - a))].view(2, b - a, -1))
    assert torch.equal(torch.cat(got, 1), want)


@pytest.mark.parametrize("routing", ["causal_chunks", "sequence"])
def test_padding_routes_each_row_like_the_row_alone(routing):
    """Left and right padding: real tokens read the chapters they read unpadded; pads read the shared chapter."""
    cfg = moc_cfg(routing, chunk_len=3).memory
    torch.manual_seed(8)
    router = torch.nn.Linear(16, cfg.chapters.n_chapters)
    rows = [torch.randn(1, n, 16) for n in (7, 4, 9)]
    S = 11
    x = torch.zeros(3, S, 16)
    mask = torch.zeros(3, S, dtype=torch.bool)
    lefts = (S - 7, 0, 1)  # row 0 left-padded, row 1 right-padded, row 2 both
    for b, (r, left) in enumerate(zip(rows, lefts)):
        x[b, left:left + r.shape[1]] = r[0]
        mask[b, left:left + r.shape[1]] = True
        x[b, ~mask[b]] = 5.0  # pads carry junk: it must not reach any mean
    got = route(x, router, cfg, mask=mask)
    seg = torch.repeat_interleave(torch.arange(len(got.offsets) - 1), got.offsets.diff(), output_size=3 * S).view(3, S)
    for b, (r, left) in enumerate(zip(rows, lefts)):
        alone = route(r, router, cfg)
        seg1 = torch.repeat_interleave(torch.arange(len(alone.offsets) - 1), alone.offsets.diff(), output_size=r.shape[1])
        n = r.shape[1]
        assert torch.equal(got.chapters[seg[b, left:left + n]], alone.chapters[seg1])
        torch.testing.assert_close(got.weights[seg[b, left:left + n]], alone.weights[seg1])
        pads = seg[b][~mask[b]]
        assert (got.chapters[pads][:, 0] == cfg.chapters.n_chapters).all() and (got.chapters[pads][:, 1:] == -1).all()


@torch.no_grad()
def test_left_padded_generation_equals_each_row_alone():
    model = moc_model("causal_chunks")
    prompts = [_tokens(1, (1, 9))[0], _tokens(2, (1, 5))[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    am = torch.zeros(2, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, 9 - len(p):], am[b, 9 - len(p):] = p, 1
    gen = model.generate(batch, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
        assert torch.equal(gen[b, 9:], alone[0, len(p):])


def test_router_losses_on_hand_computed_cases():
    # uniform logits, every chapter chosen equally often: balance 1 (its minimum), z = log(n)^2
    logits = torch.zeros(4, 4)
    chosen = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    lb, z = router_losses(logits, chosen, 4)
    assert lb.item() == pytest.approx(1.0)
    assert z.item() == pytest.approx(math.log(4) ** 2)
    # collapsed: every decision picks chapters 0 and 1, probabilities [0.5, 0.5, 0, 0] in the limit
    logits = torch.tensor([[10.0, 10.0, -10.0, -10.0]] * 3)
    chosen = torch.tensor([[0, 1]] * 3)
    lb, z = router_losses(logits, chosen, 4)
    p0 = 1 / (2 + 2 * math.exp(-20))  # softmax of chapter 0
    assert lb.item() == pytest.approx(4 * (0.5 * p0 + 0.5 * p0), rel=1e-6)  # f = [1/2, 1/2, 0, 0]
    assert z.item() == pytest.approx((10 + math.log(2 + 2 * math.exp(-20))) ** 2, rel=1e-6)


def test_training_forward_returns_weighted_aux_losses():
    model = moc_model("causal_chunks")
    model.train()
    ids = _tokens()
    with record_lookups(model) as lookups:
        model(ids)
    mem = memory_layers(model)[1]
    rec = lookups[1][0]
    x_hook = {}
    h = mem.register_forward_hook(lambda m, inp, out: x_hook.update(x=inp[0]))
    model(ids)
    h.remove()
    r = route(x_hook["x"], mem.router, mem.cfg)
    lb, z = router_losses(r.logits, r.chosen, 6)
    torch.testing.assert_close(rec.balance, 0.01 * lb + 0.001 * z)
    model.eval()
    with record_lookups(model) as lookups:
        model(ids)
    assert lookups[1][0].balance is None


# ----------------------------------------------------------------------------- the layer's reads


def test_layer_output_matches_an_explicit_computation():
    """out = W_o concat_h sum_j w_j softmax(q_h . K_j / sqrt(M)) K_j, by loops over tokens and chapters."""
    cfg = moc_cfg("causal_chunks", chunk_len=3).memory
    torch.manual_seed(5)
    layer = ChapterMemory(16, 16, cfg)
    torch.nn.init.normal_(layer.out_proj.weight, std=0.1)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(2, 7, 16)
    out = layer(x).out
    bank, CT, M = layer.values.weight, 5, 8
    for b in range(2):
        for s in range(7):
            chunk = s // 3
            chapters, weights = [6], [1.0]
            if chunk:
                p = F.softmax(layer.router(x[b, :chunk * 3].mean(0)), -1)
                top = p.topk(2)
                chapters += top.indices.tolist()
                weights += (top.values / top.values.sum()).tolist()
            q = layer.query(x[b, s]).view(2, M)
            heads = []
            for h in range(2):
                acc = torch.zeros(M)
                for c, w in zip(chapters, weights):
                    k = bank[c * CT:(c + 1) * CT]
                    acc += w * F.softmax(k @ q[h] / math.sqrt(M), -1) @ k
                heads.append(acc)
            torch.testing.assert_close(out[b, s], layer.out_proj(torch.cat(heads)), rtol=1e-4, atol=1e-5)


def test_accesses_are_the_top_mass_memory_tokens():
    torch.manual_seed(6)
    T, H, M, CT = 7, 2, 8, 5
    q, bank = torch.randn(T, H, M), torch.randn(6 * CT, M)
    offsets = torch.tensor([0, 3, 7])
    chapters = torch.tensor([[5, -1, 2], [5, 0, 3]])
    weights = torch.tensor([[1.0, 0.0, 0.7], [1.0, 0.4, 0.6]])
    ids, mass = chapter_accesses(q, bank, offsets, chapters, weights, CT, k=4, max_tokens=3)
    for t in range(T):
        r = 0 if t < 3 else 1
        for h in range(H):
            m = {}
            total = sum(w for c, w in zip(chapters[r].tolist(), weights[r].tolist()) if c >= 0)
            for c, w in zip(chapters[r].tolist(), weights[r].tolist()):
                if c >= 0:
                    p = F.softmax(bank[c * CT:(c + 1) * CT] @ q[t, h] / math.sqrt(M), -1)
                    for i in range(CT):
                        m[c * CT + i] = m.get(c * CT + i, 0.0) + w / total * p[i].item()
            best = sorted(m, key=lambda i: -m[i])[:4]
            assert ids[t, h].tolist() == best
            torch.testing.assert_close(mass[t, h], torch.tensor([m[i] for i in best]), rtol=1e-5, atol=1e-6)


def test_reference_matches_a_per_token_brute_force_and_its_gradients():
    torch.manual_seed(7)
    T, H, M, CT = 6, 3, 4, 3
    q = torch.randn(T, H, M, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(4 * CT, M, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 1, 4, 6])
    chapters = torch.tensor([[0, 3], [2, -1], [1, 1]])
    weights = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    out = chapter_attention_reference(q, bank, bank, offsets, chapters, weights, CT, scale=0.7)
    rows = []
    for t in range(T):
        r = int((offsets[1:] <= t).sum())
        heads = []
        for h in range(H):
            acc = torch.zeros(M, dtype=torch.float64)
            for j in range(2):
                c = int(chapters[r, j])
                if c >= 0:
                    k = bank[c * CT:(c + 1) * CT]
                    acc = acc + weights[r, j] * F.softmax(0.7 * k @ q[t, h], -1) @ k
            heads.append(acc)
        rows.append(torch.stack(heads))
    brute = torch.stack(rows)
    torch.testing.assert_close(out, brute.to(out.dtype))
    g = torch.randn_like(brute)
    got = torch.autograd.grad(out, (q, bank, weights), g)
    want = torch.autograd.grad(brute, (q, bank, weights), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sparse = torch.autograd.grad(chapter_attention_reference(q, bank, bank, offsets, chapters, weights, CT, 0.7, sparse_grad=True), bank, g)[0]
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), want[1])


# ----------------------------------------------------------------------------- retrofit, checkpoint, decoding


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@torch.no_grad()
def test_retrofit_with_zero_output_keeps_the_logits_exactly(family, input_ids):
    base = tiny_model(family)
    ref = base(input_ids).logits
    model = retrofit(base, moc_cfg(out_init_std=0.0))
    assert torch.equal(model(input_ids).logits, ref)
    mems = list(memory_layers(model).values())
    assert mems[0].values is mems[1].values  # one bank shared by the memory layers


def test_save_load_round_trip(tmp_path):
    model = moc_model("causal_chunks")
    ids = _tokens()
    with torch.no_grad():
        ref = model(ids).logits
    save_checkpoint(model, None, tmp_path / "ckpt", moc_cfg("causal_chunks"))
    cfg = read_retrofit_config(tmp_path / "ckpt")
    assert cfg.memory.kind == "chapters" and cfg.memory.chapters.chunk_len == 4
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    mems = list(memory_layers(loaded).values())
    assert isinstance(mems[0], ChapterMemory) and mems[0].values is mems[1].values
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


@torch.no_grad()
def test_kv_cache_decoding_routes_like_a_full_forward():
    model = moc_model("causal_chunks")
    ids = _tokens(shape=(2, 14))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    pieces, pkv = [out.logits], out.past_key_values
    for t in range(6, 14):
        out = model(ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        pieces.append(out.logits)
        pkv = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    # generate() with its KV cache = greedy argmax by full forwards
    gen = model.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=9,
                         do_sample=False, pad_token_id=0)
    seq = ids[:, :5]
    for _ in range(9):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


@torch.no_grad()
def test_a_cache_without_routing_state_is_refused():
    model = moc_model("causal_chunks")
    ids = _tokens(shape=(1, 6))
    pkv = model(ids, use_cache=True).past_key_values
    delattr(pkv, "slotwise_chapter_routing")
    with pytest.raises(RuntimeError, match="routing state"):
        model(ids[:, :1], past_key_values=pkv, use_cache=True)


# ----------------------------------------------------------------------------- continual learning on the bank


def test_slot_statistics_and_smf_apply_to_the_bank():
    from slotwise.continual.selection import Background
    from slotwise.continual.smf import SMFConfig, SparseMemoryFinetuner
    from slotwise.slot_stats import collect

    model = moc_model("causal_chunks")
    n = memory_layers(model)[1].n_slots
    per_layer, per_pool = collect(model, [_tokens(s, (2, 12)) for s in range(3)])
    assert set(per_pool) == {"shared"} and per_pool["shared"].n_slots == n == 7 * 5
    assert per_layer[1].counts.sum() == 3 * 2 * 12 * 2 * 3  # batches x tokens x heads x access_k
    bg = Background(per_pool["shared"].counts, per_pool["shared"].df, per_pool["shared"].n_batches)
    smf = SparseMemoryFinetuner(model, {1: bg}, SMFConfig(top_t=4, score="tfidf", lr=0.1, optimizer="sgd", count_on="all"))
    bank = memory_layers(model)[1].values.weight
    before = bank.detach().clone()
    ids = _tokens(9, (2, 12))
    out = smf.step({"input_ids": ids, "labels": ids})
    rows = out["selected"][1]
    changed = (bank.detach() != before).any(1).nonzero().squeeze(1)
    assert 0 < rows.numel() <= 4 and set(changed.tolist()) <= set(rows.tolist()) and changed.numel() > 0


# ----------------------------------------------------------------------------- pretraining from scratch


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """background/{train,heldout,stats}.jsonl: a few hundred words of plain sentences."""
    import json

    words = "the river flows past the old mill where a miller grinds wheat into flour for the town bakery".split()
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (120,), generator=g).tolist()) + "." for _ in range(16)]
    root = tmp_path_factory.mktemp("data")
    (root / "background").mkdir()
    for name, part in (("heldout", docs[:3]), ("stats", docs[3:6]), ("train", docs[6:])):
        (root / "background" / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return root


@pytest.mark.parametrize("variant", ["memory", "dense"])
def test_pretrain_chapters_vs_iso_flop_dense(tmp_path, text_data, variant):
    from slotwise.components import train as train_component
    from slotwise.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text(f"""
train:
  mode: pretrain
  seq_len: 16
  batch_size: 2
  eval_batches: 1
  report_batches: 1
  loop: {{max_steps: 3, eval_every: 3, save_every: 3, early_stop_patience: null, balance_weight: 1.0, optim: {{warmup_steps: 1}}}}
  pretrain: {{variant: {variant}, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64, memory_layers: [1]}}
retrofit:
  insert:
    memory: {{kind: chapters, heads: 2, chapters: {{n_chapters: 6, chapter_tokens: 5, top_c: 2, chunk_len: 4, access_k: 2}}}}
""")
    args = ["--params", str(params), "--model", "embedded:smollm2-135m-instruct", "--data", str(text_data), "--out", str(tmp_path / "out")]
    assert train_component.main(args) == 0
    model, _ = load_checkpoint(tmp_path / "out")
    flops = train_component.memory_flops_per_token(32, load_params(params).retrofit.insert.memory)
    # worked out: query 32*2*16 + attention 2*2*16*(2+1)*5 + out 2*16*32 + router 32*6 // 4
    assert flops == 1024 + 960 + 1024 + 48
    if variant == "dense":
        assert model.config.intermediate_size == 64 + 16 and not memory_layers(model)  # 3056 / (3*32*2) = 15.9
    else:
        mem = memory_layers(model)[1]
        assert isinstance(mem, ChapterMemory) and mem.values.weight.shape == (7 * 5, 16)
        history = (tmp_path / "out" / "history.json").read_text()
        assert '"balance"' in history  # the router's aux losses were trained


@torch.no_grad()
def test_a_deep_copy_routes_on_its_own_context():
    import copy

    model = moc_model("causal_chunks")
    twin = copy.deepcopy(model)
    a, b = memory_layers(model)[1], memory_layers(twin)[1]
    assert a.routing is not b.routing and b.routing is memory_layers(twin)[3].routing
    ids = _tokens(shape=(1, 10))
    out = twin(ids[:, :6], use_cache=True)
    step = twin(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, model(ids).logits[:, 6:], rtol=1e-5, atol=1e-5)
