"""benchmarks/bench_translation.py measures what it says: both rows of a case from the same
weights and batches, the timing and its columns, the reference's decoding, the time budget.
(The CPU smoke run of the whole script is in test_benchmarks_smoke.py.)"""
import time

import pytest
import torch

from benchmarks import bench_translation as bt
from benchmarks.translation_data import PAD, Grammar, encode_batch
from benchmarks.translation_refs import _TORCH_NAMES


def test_schedule_warms_up_from_above_zero_then_decays_to_a_tenth():
    f = [bt._schedule(s, 100) for s in range(100)]
    assert 0 < f[0] < f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and 0.1 <= f[-1] < 0.12


def _counting_model():
    """A one-parameter model and a loss whose value is the step index."""
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(()))
    values = iter(range(1000))
    return model, lambda model, *a, **k: model.p * 0 + float(next(values))


@pytest.mark.parametrize("steps", [40, 6])
def test_train_times_only_after_warmup_and_averages_the_last_tenth(steps):
    model, loss_fn = _counting_model()
    data = [(None, None, None, None, 7)]
    r = bt.train(model, loss_fn, data, steps, 1e-3, torch.device("cpu"), None)
    warm = min(bt.WARMUP_STEPS, steps // 2)
    assert bt.warmup_steps(steps) == warm
    assert r["steps"] == steps and len(r["times"]) == steps - warm
    assert r["tokens"] == [7] * (steps - warm)
    tail = list(range(steps))[-max(1, steps // 10):]
    assert r["loss"] == pytest.approx(sum(tail) / len(tail))


def test_train_stops_at_the_deadline_and_says_how_far_it_got():
    model, loss_fn = _counting_model()
    r = bt.train(model, loss_fn, [(None, None, None, None, 7)], 50, 1e-3,
                 torch.device("cpu"), time.time() - 1)
    assert r["steps"] == 0 and r["times"] == []
    with pytest.raises(RuntimeError, match="no timed step"):
        bt._timed(r)


def test_tok_s_leaves_out_compile_outliers_and_counts_them():
    r = {"steps": 5, "times": [1.0, 1.0, 50.0, 1.0, 1.0], "tokens": [100, 100, 100, 100, 100]}
    cols = bt._timed(r)
    assert cols["ms"] == 1.0 and cols["outliers"] == 1
    assert cols["tok/s"] == 100000        # 400 tokens in 4 ms
    cols = bt._timed({"steps": 2, "times": [2.0, 4.0], "tokens": [10, 30]})
    assert cols["tok/s"] == round(40 / 6e-3) and cols["outliers"] == 0


def _fake_training(monkeypatch, probe, seen, deadline_after=None, sleep=0.0):
    def fake_train(model, loss_fn, data, steps, lr, device, stop_at):
        time.sleep(sleep)
        model.eval()
        with torch.no_grad():
            logits = model(probe[0], probe[1], probe[2])
        seen.append((model, loss_fn, data, logits))
        ms = 2.0 if len(seen) % 2 == 0 else 1.0     # the reference twice as slow
        done = steps if deadline_after is None or len(seen) <= deadline_after else steps // 2
        return {"steps": done, "times": [ms] * 3, "tokens": [10] * 3, "loss": 1.0,
                "peak_mb": None}
    monkeypatch.setattr(bt, "train", fake_train)
    monkeypatch.setattr(bt, "evaluate", lambda *a, **k: {})


def test_bench_rows_share_weights_batches_and_speedup_is_reference_over_ours(monkeypatch,
                                                                             tmp_path):
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    seen = []
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    _fake_training(monkeypatch, encode_batch(g.pairs(4, seed=2), sv, tv), seen)
    rows = bt.main(["--device", "cpu"])
    for k in (0, 2):
        (fm, floss, fdata, fl), (rm, rloss, rdata, rl) = seen[k], seen[k + 1]
        assert fm is not rm and fdata is rdata
        torch.testing.assert_close(fl, rl, rtol=1e-5, atol=1e-5)
        assert floss is bt._fast_loss and rloss is bt.hf_loss
    for src, lengths, tgt_in, tgt_out, n_tok in seen[0][2]:
        assert n_tok == int(lengths.sum()) + int((tgt_out != PAD).sum())
        assert lengths.device.type == "cpu"   # no device read a step for the length checks
    fast = [r for r in rows if r["impl"] == "fastbert"]
    assert len(rows) == 4 and all(r["speedup_vs_reference"] == 2.0 for r in fast)
    assert all(r["tok/s"] == 10000 for r in fast)
    assert all("note" not in r and r["steps_run"] == r["steps"] for r in rows)


def test_bench_row_cut_by_the_time_budget_says_so(monkeypatch, tmp_path, capsys):
    """A row the budget stopped has a note and says so; rows not started are listed in a
    paragraph of the markdown that starts "Time budget" (gpu_check.sh greps for it); the files
    are written after every row, "Incomplete" until the end."""
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    seen, writes = [], []
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    # the first row sleeps past the deadline: no other row starts
    _fake_training(monkeypatch, encode_batch(g.pairs(4, seed=2), sv, tv), seen, sleep=0.6)
    monkeypatch.setattr(bt._harness, "deadline", lambda: time.time() + 0.5)
    real = bt._harness.write_results
    monkeypatch.setattr(bt._harness, "write_results",
                        lambda bench, rows, *a, **kw: (writes.append((len(rows), kw["note"])),
                                                       real(bench, rows, *a, **kw))[1])
    rows = bt.main(["--device", "cpu"])
    assert [r["impl"] for r in rows] == ["fastbert"]
    assert "lstm fastbert, lstm reference" in writes[-1][1] and "transformer reference" in \
        writes[-1][1]
    md = next(tmp_path.glob("translation_*.md")).read_text()
    assert any(line.startswith("Time budget") for line in md.splitlines())
    assert writes[0][0] == 1 and "\n\nIncomplete: the run stopped after 1 of 4 rows." in \
        writes[0][1]
    assert "Incomplete" not in writes[-1][1]


def test_bench_row_stopped_mid_training_gets_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    seen = []
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    _fake_training(monkeypatch, encode_batch(g.pairs(4, seed=2), sv, tv), seen, deadline_after=1)
    rows = bt.main(["--device", "cpu", "--models", "transformer,transformer"])
    assert [r["impl"] for r in rows] == ["fastbert", "reference"]   # each model once
    assert "note" not in rows[0] and rows[1]["note"] == (
        f"stopped by the time budget after {rows[1]['steps'] // 2} of {rows[1]['steps']} steps")
    assert rows[1]["steps_run"] == rows[1]["steps"] // 2
    assert "transformer reference: stopped by the time budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--steps", "1"], "--steps must be >= 2"),
                                          (["--steps", "0"], "--steps must be >= 2"),
                                          (["--max-tokens", "0"], "--max-tokens must be >= 1"),
                                          (["--models", "gru"], "--models: expected names")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bt.parse_args(["--device", "cpu"] + argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("eos_bias", [0.0, 1.5])
def test_reference_greedy_decodes_what_the_models_greedy_decode_does(monkeypatch, eos_bias):
    """bench_translation.greedy on TorchTransformerSeq2Seq (no cache) = Seq2SeqTransformer's
    greedy_decode from the same weights, pad / bos never generated though they score highest
    (untrained models, their biases raised): every step of max_len (eos bias 0), or eos at
    once (bias 1.5); the source encoded once, not at every step."""
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    impls = bt.build("transformer", sv, tv, True, torch.device("cpu"))
    (fast, _), (ref, _) = impls["fastbert"], impls["reference"]
    fast.eval()
    ref.eval()
    with torch.no_grad():
        for m in (fast, ref):
            m.out.bias[[0, 1]] += 3.0
            m.out.bias[2] += eos_bias
    src, lengths, _, tgt_out = encode_batch(g.pairs(16, seed=4), sv, tv)
    a = bt.greedy(fast, src, lengths, 12)
    encodes = []
    real = ref.encode
    monkeypatch.setattr(ref, "encode", lambda *x: (encodes.append(1), real(*x))[1])
    b = bt.greedy(ref, src, lengths, 12)
    assert torch.equal(a, b) and encodes == [1]
    assert not torch.isin(a, torch.tensor([0, 1])).any()
    if eos_bias:
        assert a.shape[1] == 1 and (a == 2).all()
    else:
        assert a.shape[1] == 12 and not (a == 2).any()


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_training_on_the_kernels_follows_the_reference_step_for_step(kind, monkeypatch):
    """The bench's two rows of a case, dropout off, fastbert's model forced onto the Triton
    kernels (the interpreter, fp32): the same losses at every SGD step as the reference
    (torch's Transformer layers / cuDNN-path LSTM with the HF loss), from the same weights on
    the same batches: what makes the rows' speed comparable, and the kernels' gradients right
    in training (each step's loss depends on every earlier step's gradients)."""
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    cfg = dict(bt.model_configs(True)[kind], dropout=0.0)
    monkeypatch.setattr(bt, "model_configs", lambda quick: {kind: cfg})
    impls = bt.build(kind, sv, tv, True, torch.device("cpu"))
    fast = impls["fastbert"][0]
    for m in (fast,) if kind == "transformer" else (fast, fast.encoder, fast.decoder):
        m.backend = "triton"
    data = list(bt.batches(g.pairs(60, seed=1), sv, tv, 96, seed=0))[:4]
    losses = {}
    for impl, (model, loss_fn) in impls.items():
        # plain SGD: the update is the gradient (Adam's first steps are its sign only)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model.train()
        losses[impl] = []
        for src, lengths, tgt_in, tgt_out in data:
            loss = loss_fn(model, src, lengths, tgt_in, tgt_out, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert len(losses["fastbert"]) == 4
    torch.testing.assert_close(torch.tensor(losses["fastbert"]), torch.tensor(losses["reference"]),
                               rtol=1e-5, atol=1e-5)
    assert losses["fastbert"][0] != losses["fastbert"][-1]
    # and the same weights after the steps (the sum of every step's gradients: a recurrent
    # gradient barely moves these tiny models' loss), by the reference's names
    theirs = impls["reference"][0].state_dict()
    for name, p in fast.named_parameters():
        for ours, torch_name in _TORCH_NAMES:
            name = name.replace(ours, torch_name)
        torch.testing.assert_close(p, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
