"""The built-in synthetic translation task (benchmarks/translation_data.py): deterministic,
a function from source to target, the rules it claims, and the batching."""
import collections

import pytest
import torch

from benchmarks.translation_data import (BOS, EOS, PAD, UNK, Grammar, Vocab, batches,
                                         encode_batch)


@pytest.fixture(scope="module")
def tiny():
    return Grammar.tiny()


def test_same_seed_same_pairs_and_languages():
    a, b = Grammar.tiny(), Grammar.tiny()
    assert a.pairs(50, seed=3) == b.pairs(50, seed=3)
    assert a.pairs(50, seed=3) != a.pairs(50, seed=4)
    assert Grammar(n_nouns=12, n_verbs=6, n_adjectives=6, n_preps=3, seed=1).pairs(20, 3) \
        != a.pairs(20, 3)
    assert [w for w in a.vocabularies()[1].words] == [w for w in b.vocabularies()[1].words]


def test_every_word_is_in_the_vocabularies_and_round_trips(tiny):
    src_vocab, tgt_vocab = tiny.vocabularies()
    for s, t in tiny.pairs(500, seed=0):
        assert UNK not in src_vocab.encode(s) and UNK not in tgt_vocab.encode(t)
        assert src_vocab.decode(src_vocab.encode(s)) == s
        assert tgt_vocab.decode(tgt_vocab.encode(t)) == t
    assert src_vocab.encode("zzz the") == [UNK, src_vocab.ids["the"]]


def test_the_translation_is_a_function_of_the_source():
    """A lexicon of a few words repeats sentences: each source always gets the same target."""
    grammar = Grammar(n_nouns=2, n_verbs=1, n_adjectives=1, n_preps=1)
    seen = {}
    repeats = 0
    for seed in range(2):
        for s, t in grammar.pairs(2000, seed=seed):
            repeats += s in seen
            assert seen.setdefault(s, t) == t
    assert repeats > 300


def test_word_order_negation_and_agreement(tiny):
    """The rules of the module docstring, on one-clause sentences: the verb last (after the
    negation word when the source says "not"), each source noun's translation present in the
    number the source has, each adjective agreeing with its noun's gender."""
    verb_forms = {v.tgt + e: e for v in tiny.verbs for e in tiny.verb_end.values()}
    nouns = {n.src: n for n in tiny.nouns}
    plurals = {n.src_plural: n for n in tiny.nouns}
    adjectives = dict(tiny.adjectives)
    checked = collections.Counter()
    for s, t in tiny.pairs(400, seed=5):
        src, tgt = s.split(), t.split()
        if any(c in src for c, _ in tiny.conj):
            continue
        assert tgt[-1] == "." and tgt[-2] in verb_forms
        negated = "not" in src
        assert (tgt[-3] == tiny.neg) == negated and tgt.count(tiny.neg) == negated
        if "did" in src or any(w.endswith("ed") and w[:-2] in {v.src_pl for v in tiny.verbs}
                               for w in src):
            assert verb_forms[tgt[-2]] == tiny.verb_end["past"]
            checked["past"] += 1
        for i, w in enumerate(src):
            noun = nouns.get(w) or plurals.get(w)
            if noun is None:
                continue
            form = noun.tgt + (tiny.plural_end if w in plurals else "")
            assert form in tgt
            if i and src[i - 1] in adjectives:
                want = adjectives[src[i - 1]] + tiny.adj_end[noun.gender] + (
                    "s" if w in plurals else "")
                assert any(tgt[j:j + 2] == [form, want] for j in range(len(tgt)))
                checked["adjective"] += 1
        checked["sentences"] += 1
    assert checked["sentences"] > 100 and checked["adjective"] > 50 and checked["past"] > 30


def test_splits_keep_test_sources_out_of_train(tiny):
    parts = tiny.splits(2000, 200, seed=2)
    assert len(parts["train"]) == 2000 and len(parts["test"]) == 200
    assert not {s for s, _ in parts["test"]} & {s for s, _ in parts["train"]}


def test_vocab_decode_stops_at_eos_and_drops_pad_and_bos():
    v = Vocab(["x", "y"])
    assert v.words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and len(v) == 6
    assert v.decode([BOS, 4, PAD, 5, EOS, 4]) == "x y"
    assert v.decode(torch.tensor([4, 99])) == "x <unk>"
    with pytest.raises(ValueError, match="distinct"):
        Vocab(["x", "x"])


def test_encode_batch_layout(tiny):
    src_vocab, tgt_vocab = tiny.vocabularies()
    pairs = tiny.pairs(5, seed=0)
    src, lengths, tgt_in, tgt_out = encode_batch(pairs, src_vocab, tgt_vocab)
    for i, (s, t) in enumerate(pairs):
        n, m = len(s.split()), len(t.split())
        assert lengths[i] == n and src_vocab.decode(src[i]) == s and (src[i, n:] == PAD).all()
        assert tgt_in[i, 0] == BOS and tgt_vocab.decode(tgt_in[i]) == t
        assert tgt_out[i, m] == EOS and tgt_vocab.decode(tgt_out[i]) == t
        assert torch.equal(tgt_in[i, 1:m + 1], tgt_out[i, :m]) and (tgt_out[i, m + 1:] == PAD).all()
    assert src.shape[1] == int(lengths.max()) and tgt_in.shape == tgt_out.shape


@pytest.mark.parametrize("max_tokens", [1, 64, 1000])
def test_batches_cover_every_pair_once_within_the_token_budget(tiny, max_tokens):
    src_vocab, tgt_vocab = tiny.vocabularies()
    pairs = tiny.pairs(300, seed=1)
    seen = collections.Counter()
    n_batches = 0
    for src, lengths, tgt_in, tgt_out in batches(pairs, src_vocab, tgt_vocab, max_tokens, seed=4):
        n_batches += 1
        assert src.shape[0] == 1 or src.numel() + tgt_in.numel() <= max_tokens
        for i in range(src.shape[0]):
            seen[(src_vocab.decode(src[i]), tgt_vocab.decode(tgt_out[i]))] += 1
    assert seen == collections.Counter(pairs)
    if max_tokens == 1:
        assert n_batches == len(pairs)
    if max_tokens == 1000:
        assert n_batches < len(pairs) / 10   # batches fill up (similar lengths together)


def test_bad_arguments_raise(tiny):
    src_vocab, tgt_vocab = tiny.vocabularies()
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        next(batches(tiny.pairs(2, 0), src_vocab, tgt_vocab, 0))
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        tiny.pairs(-1, 0)
    with pytest.raises(ValueError, match="n_nouns must be a positive int"):
        Grammar(n_nouns=0)


def _oracle(g, source):
    """The target the module docstring's rules give, from an independent parse of the source
    (every rule: word order, the fronted prepositional phrase, negation, tense and number on
    the verb, determiner / adjective agreement, the numeral after the adjective)."""
    nouns = {n.src: (n, False) for n in g.nouns}
    nouns.update({n.src_plural: (n, True) for n in g.nouns})
    verbs = {}
    for v in g.verbs:
        verbs[v.src_sg], verbs[v.src_pl], verbs[v.src_past] = (v, "sg"), (v, "pl"), (v, "past")
    adjs, preps, nums = dict(g.adjectives), dict(g.preps), dict(g.numbers)
    conj = dict(g.conj)

    def np_(w, i):
        kind = {"the": "def", "a": "indef", "some": "indef"}.get(w[i], "num")
        number = nums.get(w[i])
        i += 1
        adj = adjs.get(w[i])
        i += adj is not None
        noun, plural = nouns[w[i]]
        out = [] if kind == "num" else [g.det[(kind, noun.gender, plural)]]
        out.append(noun.tgt + (g.plural_end if plural else ""))
        if adj is not None:
            out.append(adj + g.adj_end[noun.gender] + ("s" if plural else ""))
        if number is not None:
            out.append(number)
        return out, i + 1, plural

    words = source.split()
    assert words[-1] == "."
    words = words[:-1]
    cut = next((k for k, x in enumerate(words) if x in conj), None)
    parts = [words] if cut is None else [words[:cut], words[cut + 1:]]
    out = []
    for j, w in enumerate(parts):
        subj, i, plural = np_(w, 0)
        if w[i] in ("does", "do", "did"):
            form = "past" if w[i] == "did" else ("pl" if plural else "sg")
            verb_t = [g.neg, verbs[w[i + 2]][0].tgt + g.verb_end[form]]
            i += 3
        else:
            verb, form = verbs[w[i]]
            form = form if form == "past" else ("pl" if plural else "sg")
            verb_t = [verb.tgt + g.verb_end[form]]
            i += 1
        obj, i, _ = np_(w, i)
        pp = []
        if i < len(w):
            prep = preps[w[i]]
            np_t, i, _ = np_(w, i + 1)
            pp = [prep] + np_t
        assert i == len(w)
        if j:
            out.append(conj[words[cut]])
        out += pp + subj + obj + verb_t
    return " ".join(out + ["."])


@pytest.mark.parametrize("grammar", [Grammar.tiny, Grammar.default])
def test_every_target_is_what_the_rules_give_for_its_source(grammar):
    """The generator and an independent implementation of its rules agree on every pair."""
    g = grammar()
    for s, t in g.pairs(400, seed=9):
        assert _oracle(g, s) == t, s


def test_splits_exclude_test_sources_where_the_language_repeats_sentences():
    g = Grammar(n_nouns=2, n_verbs=1, n_adjectives=1, n_preps=1)
    parts = g.splits(3000, 300, seed=0)
    assert not {s for s, _ in parts["test"]} & {s for s, _ in parts["train"]}


def test_batches_are_deterministic_for_a_seed():
    g = Grammar.tiny()
    sv, tv = g.vocabularies()
    pairs = g.pairs(300, seed=1)
    a = [b[0] for b in batches(pairs, sv, tv, 128, seed=3)]
    b = [b[0] for b in batches(pairs, sv, tv, 128, seed=3)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
