"""A synthetic translation task, built in (nothing downloads): a made-up language pair whose
sentences a generator draws without end, for ``bench_translation.py`` (#5's comparison of
``LSTMSeq2Seq`` and ``Seq2SeqTransformer``).

Both languages' words are made of syllables drawn from a seed (``Grammar``). A source clause
is subject, verb, object and an optional prepositional phrase; its translation reorders and
inflects it, so that a model must learn word order and agreement, not only a word list:

- word order: the prepositional phrase moves to the front, the verb to the end (SOV), the
  negation word sits just before the verb: ``[PP] SUBJ OBJ [NEG] VERB``;
- noun phrases: the adjective follows the noun and agrees with the noun's gender and number,
  a numeral follows the adjective, the determiner agrees with gender and number;
- verbs inflect for number and tense (the source's "does not" / "did not" auxiliaries become
  the verb's tense ending and a negation word);
- two clauses may be joined by a conjunction, each translated that way.

Source: ``the big cat does not see three red birds near the river .``
Target (schematically): ``near the river the cat-big birds-red-PL three NOT see-PRES-SG .``

The mapping is deterministic (one translation per source sentence), so BLEU against it
measures how much of the grammar a model learned.

    g = Grammar.default()
    train = g.pairs(10000, seed=1)        # [(source, target), ...] whitespace-tokenized
    src_vocab, tgt_vocab = g.vocabularies()
    for src, src_lengths, tgt_in, tgt_out in batches(train, src_vocab, tgt_vocab, 4096): ...
"""
from __future__ import annotations

import dataclasses
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

Pair = Tuple[str, str]

# syllables of each language's made-up words (distinct sets: no word is shared by chance)
_SRC_ONSETS = "b d f g h k l m n p r s t v w".split()
_SRC_NUCLEI = "a e i o u ai ou ee".split()
_TGT_ONSETS = "c j q x z ch sh zh ts dz".split()
_TGT_NUCLEI = "y ae oe ua io ye".split()
_GENDERS = ("m", "f", "n")
_NUMBERS = ("two", "three", "four", "five")
_SRC_FUNCTION = ("the", "a", "some", "does", "did", "do", "not", "and", "but", ".")


class Vocab:
    """Word <-> id: the four specials (pad, bos, eos, unk) first, then ``words`` in order."""

    def __init__(self, words: Sequence[str]):
        self.words: List[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.ids: Dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ValueError("Vocab: words must be distinct")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str) -> List[int]:
        """Whitespace-split words -> ids (an unknown word -> UNK)."""
        return [self.ids.get(w, UNK) for w in sentence.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> a sentence: stops at the first EOS, drops PAD and BOS."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.words[i] if 0 <= i < len(self.words) else SPECIALS[UNK])
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class _Noun:
    src: str
    src_plural: str
    tgt: str
    gender: str


@dataclasses.dataclass(frozen=True)
class _Verb:
    src_sg: str
    src_pl: str
    src_past: str
    tgt: str


class Grammar:
    """The language pair: a lexicon drawn from ``seed`` (``n_nouns`` nouns, ``n_verbs``
    transitive verbs, ``n_adjectives`` adjectives, ``n_preps`` prepositions) and the rules of
    the module docstring. Same arguments, same languages."""

    def __init__(self, n_nouns: int = 600, n_verbs: int = 200, n_adjectives: int = 200,
                 n_preps: int = 12, seed: int = 0):
        for name, n in (("n_nouns", n_nouns), ("n_verbs", n_verbs),
                        ("n_adjectives", n_adjectives), ("n_preps", n_preps)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        rng = random.Random(seed)
        taken: set = set(_NUMBERS) | set(_SRC_FUNCTION)
        src = lambda k: self._word(rng, _SRC_ONSETS, _SRC_NUCLEI, k, taken)
        tgt = lambda k: self._word(rng, _TGT_ONSETS, _TGT_NUCLEI, k, taken)
        self.nouns = [_Noun(w, w + "s", tgt(2), rng.choice(_GENDERS))
                      for w in (src(2) for _ in range(n_nouns))]
        self.verbs = [_Verb(w + "s", w, w + "ed", tgt(2)) for w in (src(2) for _ in range(n_verbs))]
        self.adjectives = [(src(2), tgt(2)) for _ in range(n_adjectives)]
        self.preps = [(src(1), tgt(1)) for _ in range(n_preps)]
        self.numbers = [(n, tgt(1)) for n in _NUMBERS]
        # the target's function words (made-up too, one syllable: drawn after the lexicon)
        self.det = {(d, g, pl): tgt(1) for d in ("def", "indef") for g in _GENDERS
                    for pl in (False, True)}
        self.neg, self.plural_end = tgt(1), "en"
        self.adj_end = {g: e for g, e in zip(_GENDERS, ("o", "a", "e"))}
        self.verb_end = {"sg": "ta", "pl": "tan", "past": "to"}
        self.conj = [("and", tgt(1)), ("but", tgt(1))]

    @classmethod
    def default(cls) -> "Grammar":
        return cls()

    @classmethod
    def tiny(cls) -> "Grammar":
        """A small lexicon (CPU smoke runs)."""
        return cls(n_nouns=12, n_verbs=6, n_adjectives=6, n_preps=3)

    @staticmethod
    def _word(rng: random.Random, onsets, nuclei, syllables: int, taken: set) -> str:
        while True:
            w = "".join(rng.choice(onsets) + rng.choice(nuclei) for _ in range(syllables))
            # a noun's plural and a verb's forms add endings: keep every stem's forms apart
            if not any(x in taken for x in (w, w + "s", w + "ed")):
                taken.update((w, w + "s", w + "ed"))
                return w

    # --------------------------------------------------------------------------------------
    # sentences

    def _np(self, rng: random.Random) -> Tuple[List[str], List[str], bool]:
        """A noun phrase: (source words, target words, plural)."""
        noun = rng.choice(self.nouns)
        plural = rng.random() < 0.4
        adj = rng.choice(self.adjectives) if rng.random() < 0.5 else None
        src: List[str] = []
        tgt: List[str] = []
        number = None
        if plural:
            kind = rng.choice(("def", "indef", "num"))
            if kind == "num":
                number = rng.choice(self.numbers)
                src.append(number[0])
            else:
                src.append("the" if kind == "def" else "some")
                tgt.append(self.det[(kind, noun.gender, True)])
        else:
            kind = rng.choice(("def", "indef"))
            src.append("the" if kind == "def" else "a")
            tgt.append(self.det[(kind, noun.gender, False)])
        if adj is not None:
            src.append(adj[0])
        src.append(noun.src_plural if plural else noun.src)
        tgt.append(noun.tgt + (self.plural_end if plural else ""))
        if adj is not None:
            tgt.append(adj[1] + self.adj_end[noun.gender] + ("s" if plural else ""))
        if number is not None:
            tgt.append(number[1])
        return src, tgt, plural

    def _clause(self, rng: random.Random) -> Tuple[List[str], List[str]]:
        subj_src, subj_tgt, subj_plural = self._np(rng)
        obj_src, obj_tgt, _ = self._np(rng)
        verb = rng.choice(self.verbs)
        tense = rng.choice(("present", "past"))
        negated = rng.random() < 0.25
        form = "past" if tense == "past" else ("pl" if subj_plural else "sg")
        if negated:
            aux = "did" if tense == "past" else ("do" if subj_plural else "does")
            verb_src = [aux, "not", verb.src_pl]
        else:
            verb_src = [{"past": verb.src_past, "pl": verb.src_pl, "sg": verb.src_sg}[form]]
        verb_tgt = ([self.neg] if negated else []) + [verb.tgt + self.verb_end[form]]
        pp_src: List[str] = []
        pp_tgt: List[str] = []
        if rng.random() < 0.4:
            prep = rng.choice(self.preps)
            np_src, np_tgt, _ = self._np(rng)
            pp_src, pp_tgt = [prep[0]] + np_src, [prep[1]] + np_tgt
        return (subj_src + verb_src + obj_src + pp_src,
                pp_tgt + subj_tgt + obj_tgt + verb_tgt)

    def sentence(self, rng: random.Random) -> Pair:
        """One (source, target) pair: one clause, or two joined by a conjunction, and '.'."""
        src, tgt = self._clause(rng)
        if rng.random() < 0.3:
            conj = rng.choice(self.conj)
            src2, tgt2 = self._clause(rng)
            src, tgt = src + [conj[0]] + src2, tgt + [conj[1]] + tgt2
        return " ".join(src + ["."]), " ".join(tgt + ["."])

    def pairs(self, n: int, seed: int, exclude: Optional[set] = None) -> List[Pair]:
        """``n`` pairs drawn from ``seed`` (the same ones for the same seed), none whose
        source is in ``exclude``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        rng = random.Random(seed)
        out: List[Pair] = []
        while len(out) < n:
            pair = self.sentence(rng)
            if exclude is None or pair[0] not in exclude:
                out.append(pair)
        return out

    def splits(self, n_train: int, n_test: int, seed: int = 1) -> Dict[str, List[Pair]]:
        """{"train": ..., "test": ...}: no test source sentence occurs in train."""
        test = self.pairs(n_test, seed=seed + 1_000_003)
        train = self.pairs(n_train, seed=seed, exclude={s for s, _ in test})
        return {"train": train, "test": test}

    def vocabularies(self) -> Tuple[Vocab, Vocab]:
        """(source, target) vocabularies: every word either language can produce."""
        src = list(_SRC_FUNCTION) + [n for n, _ in self.numbers]
        src += [w for n in self.nouns for w in (n.src, n.src_plural)]
        src += [w for v in self.verbs for w in (v.src_sg, v.src_pl, v.src_past)]
        src += [a for a, _ in self.adjectives] + [p for p, _ in self.preps]
        tgt = [".", self.neg] + sorted(set(self.det.values())) + [c for _, c in self.conj]
        tgt += [t for _, t in self.numbers] + [t for _, t in self.preps]
        tgt += [n.tgt + e for n in self.nouns for e in ("", self.plural_end)]
        tgt += [v.tgt + e for v in self.verbs for e in self.verb_end.values()]
        tgt += [a + self.adj_end[g] + s for _, a in self.adjectives for g in _GENDERS
                for s in ("", "s")]
        # an inflected target form may spell another stem (a homonym): one id for both
        return Vocab(list(dict.fromkeys(src))), Vocab(list(dict.fromkeys(tgt)))


Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def encode_batch(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab) -> Batch:
    """(src (B, S), src_lengths (B,), tgt_in (B, T), tgt_out (B, T)), int64 on the CPU, padded
    with PAD: tgt_in is BOS then the target, tgt_out the target then EOS."""
    src_ids = [src_vocab.encode(s) for s, _ in pairs]
    tgt_ids = [tgt_vocab.encode(t) for _, t in pairs]
    n = len(pairs)
    s_len = max((len(s) for s in src_ids), default=0)
    t_len = max((len(t) for t in tgt_ids), default=0) + 1
    src = torch.full((n, s_len), PAD, dtype=torch.long)
    tgt_in = torch.full((n, t_len), PAD, dtype=torch.long)
    tgt_out = torch.full((n, t_len), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        tgt_in[i, :len(t) + 1] = torch.tensor([BOS] + t, dtype=torch.long)
        tgt_out[i, :len(t) + 1] = torch.tensor(t + [EOS], dtype=torch.long)
    lengths = torch.tensor([len(s) for s in src_ids], dtype=torch.long)
    return src, lengths, tgt_in, tgt_out


def batches(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab, max_tokens: int,
            seed: int = 0, shuffle: bool = True) -> Iterator[Batch]:
    """One pass over ``pairs`` in batches of similar length (sorted by source length within
    windows of 100 batches' worth), each at most ``max_tokens`` padded source + target tokens
    (one pair per batch at least); the batch order shuffled by ``seed``."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    length = lambda i: (len(pairs[i][0].split()), len(pairs[i][1].split()) + 1)
    groups: List[List[int]] = []
    window = max(1, 100 * max_tokens // 16)
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=length)
        group: List[int] = []
        s_max = t_max = 0
        for i in chunk:
            s, t = length(i)
            s2, t2 = max(s_max, s), max(t_max, t)
            if group and (len(group) + 1) * (s2 + t2) > max_tokens:
                groups.append(group)
                group, s2, t2 = [], s, t
            group.append(i)
            s_max, t_max = s2, t2
        if group:
            groups.append(group)
    if shuffle:
        rng.shuffle(groups)
    for group in groups:
        yield encode_batch([pairs[i] for i in group], src_vocab, tgt_vocab)
