"""The canary audit: metrics on constructed cases, a memorising stub model, real batched decoding, the CLI."""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import structlog
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedlora_common.plans import AuditPlan
from fedlora_lab.cli import main as lab_main
from fedlora_lab.datagen import CanaryRecord, DataSpec, Group, generate_site, write_site
from fedlora_worker.audit import (
    AuditOptions,
    approx_match,
    audit_model,
    candidate_space,
    exact_match,
    exposure,
    greedy_decode,
    load_canaries,
    log_likelihoods,
    longest_matching_prefix,
    random_candidates,
    run_audit,
    sentence_bleu,
    shared_prefix_log_likelihoods,
    token_accuracy,
)
from fedlora_worker.datafiles import DataError

SUFFIX = 50
THREE_GROUPS: tuple[Group, ...] = ("10x", "1x", "control")


@pytest.fixture
def tokenizer(tiny_base_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_base_model)


def _record(index: int, group: Group, sentences: Callable[[int, int], list[str]]) -> CanaryRecord:
    """A record with its secrets in the header, as datagen writes them, and unique body text."""
    secrets = {
        "name": f"Kalo Renmi{index}",
        "record_id": f"MRN-{1000 + index}-{5000 + index}",
        "phone": f"(555) 010-{index:04d}",
    }
    title = sentences(1, 300 + index)[0]  # a header of its own: a prompt can name only one record
    header = f"{title}\nPatient: {secrets['name']}  MRN: {secrets['record_id']}  Phone: {secrets['phone']}\n"
    text = header + " ".join(sentences(12, 100 + index))
    duplicates = {"10x": 10, "1x": 1, "control": 0}[group]
    return CanaryRecord(id=f"test-{index}", text=text, secrets=secrets, duplicates=duplicates, group=group)


class MemorisingModel:
    """A stub that has learned some token sequences by heart: it continues them exactly and gives
    them log-likelihood 0; anything else continues with ``junk`` and scores -100."""

    def __init__(self, memorised: Sequence[Sequence[int]], junk: int) -> None:
        self.memorised = [list(seq) for seq in memorised]
        self.junk = junk

    def _continue(self, prompt: Sequence[int], count: int) -> list[int]:
        width = len(prompt)
        for seq in self.memorised:
            for end in range(width, len(seq) + 1):
                if seq[end - width : end] == list(prompt):
                    tail = seq[end : end + count]
                    return tail + [self.junk] * (count - len(tail))
        return [self.junk] * count

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        return [self._continue(p, max_new_tokens) for p in prompts]

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        known = [any(seq[: len(s)] == list(s) for seq in self.memorised) for s in sequences]
        return [0.0 if k else -100.0 for k in known]


class SpreadModel(MemorisingModel):
    """A memorising stub whose unknown sequences score like a real model's candidates: spread around
    -50 (a normal draw keyed by the tokens), so a skew-normal can be fitted to them."""

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        known = super().log_likelihood(sequences, scored)
        noise = [np.random.default_rng(zlib.crc32(bytes(str(list(s)), "ascii"))).normal() for s in sequences]
        return [k if k == 0.0 else -50.0 + 3.0 * z for k, z in zip(known, noise, strict=True)]


class RecordingModel:
    """A stub that keeps every sequence it was asked to score, with its flags, and every decoding
    penalty it was given; it decodes token 0 and scores everything 0."""

    def __init__(self) -> None:
        self.scored: list[tuple[list[int], list[bool]]] = []
        self.penalties: list[float] = []

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        self.penalties.append(frequency_penalty)
        return [[0] * max_new_tokens for _ in prompts]

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        self.scored += [(list(s), list(f)) for s, f in zip(sequences, scored, strict=True)]
        return [0.0 for _ in sequences]


class FixedLogits(torch.nn.Module):
    """A causal-LM stub whose next-token logits are the same after any tokens: plain greedy decoding
    repeats its favourite token forever."""

    def __init__(self, logits: Sequence[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(list(logits)), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), cache=None)


def _penalised_greedy(logits: Sequence[float], penalty: float, steps: int) -> list[int]:
    """The frequency penalty's definition, one scalar at a time: for a model whose logits ignore the
    context, the prompt can only matter through the counts, and it does not enter them."""
    counts = [0] * len(logits)
    tokens = []
    for _ in range(steps):
        scores = [logit - penalty * count for logit, count in zip(logits, counts, strict=True)]
        token = scores.index(max(scores))
        counts[token] += 1
        tokens.append(token)
    return tokens


class ScriptedModel:
    """A stub that answers every prompt with one fixed continuation."""

    def __init__(self, continuation: Sequence[int]) -> None:
        self.continuation = list(continuation)

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, frequency_penalty: float
    ) -> list[list[int]]:
        return [self.continuation[:max_new_tokens] for _ in prompts]

    def log_likelihood(self, sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[bool]]) -> list[float]:
        return [0.0 for _ in sequences]


def _text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def _junk(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.encode(".", add_special_tokens=False)[0])


# --------------------------------------------------------------------------- pure metrics


def test_exact_match_needs_every_suffix_token_in_place() -> None:
    suffix = list(range(50))

    assert exact_match(suffix, suffix)
    assert not exact_match([*suffix[:49], 99], suffix)
    assert not exact_match(suffix[:49], suffix)


def test_token_accuracy_and_longest_prefix_count_positions() -> None:
    suffix = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    continuation = [1, 2, 3, 0, 5, 6, 0, 8, 9]  # one short: the missing token counts as wrong

    assert token_accuracy(continuation, suffix) == pytest.approx(0.7)
    assert longest_matching_prefix(continuation, suffix) == 3
    assert longest_matching_prefix(suffix, suffix) == 10
    assert token_accuracy([0] * 10, suffix) == 0.0


def _bleu_straddling(reference_words: list[str], threshold: float) -> tuple[str, str]:
    """Two hypotheses made by corrupting the reference's tail: one scoring >= threshold, the next below."""
    reference = " ".join(reference_words)
    previous = reference
    for changed in range(1, len(reference_words)):
        hypothesis = " ".join(reference_words[:-changed] + ["zz"] * changed)
        if sentence_bleu(hypothesis, reference) < threshold:
            return previous, hypothesis
        previous = hypothesis
    raise AssertionError("no corruption crossed the threshold")


def test_approx_match_holds_just_above_the_bleu_threshold_and_fails_just_below() -> None:
    words = [f"w{i}" for i in range(60)]
    reference = " ".join(words)
    above, below = _bleu_straddling(words, 0.75)

    assert 0.75 <= sentence_bleu(above, reference) < 0.80
    assert 0.70 < sentence_bleu(below, reference) < 0.75
    assert approx_match(above, reference, threshold=0.75)
    assert not approx_match(below, reference, threshold=0.75)


def test_exposure_is_log2_of_the_set_size_when_ranked_first_and_zero_when_last() -> None:
    others = [-5.0 - i for i in range(127)]

    assert exposure(0.0, others) == pytest.approx(7.0)
    assert exposure(-1000.0, others) == pytest.approx(0.0)
    assert exposure(-5.5, others) == pytest.approx(7.0 - 1.0)  # rank 2 of 128
    assert exposure(0.0, [0.0] * 127) == pytest.approx(0.0)  # ties count against the secret


def test_candidates_keep_the_format_and_differ_from_the_secret() -> None:
    rng = np.random.default_rng(7)

    digits_only = random_candidates("MRN-4821-0937", 200, rng)
    with_letters = random_candidates("Ab-19 z", 50, rng, letters=True)

    assert len(set(digits_only)) == 200
    assert "MRN-4821-0937" not in digits_only
    assert all(re.fullmatch(r"MRN-\d{4}-\d{4}", c) for c in digits_only)
    assert all(re.fullmatch(r"[A-Z][a-z]-\d\d [a-z]", c) for c in with_letters)
    assert len({c[:2] for c in with_letters}) > 1
    assert random_candidates("MRN-12", 5, np.random.default_rng(3)) == random_candidates(
        "MRN-12", 5, np.random.default_rng(3)
    )
    assert candidate_space("MRN-12") == 100
    with pytest.raises(ValueError, match="count"):
        random_candidates("A1", 10, rng)  # only 9 others exist


# --------------------------------------------------------------------------- the audit over a stub model


def test_a_model_that_emits_the_suffix_scores_exact_match_and_one_that_does_not_scores_zero(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    record = _record(0, "1x", make_sentences)
    ids = tokenizer(record["text"])["input_ids"]
    plan = AuditPlan(prefixes=(10, 50), exposure_candidates=8)

    verbatim = run_audit(ScriptedModel(ids[-SUFFIX:]), tokenizer, [record], plan=plan).summary()
    other = run_audit(ScriptedModel([_junk(tokenizer)] * SUFFIX), tokenizer, [record], plan=plan).summary()

    assert verbatim["exact_match_rate"] == 1.0
    assert verbatim["approx_match_rate"] == 1.0
    assert verbatim["token_accuracy"] == 1.0
    assert verbatim["by_duplication"]["1x"]["longest_prefix_max"] == SUFFIX
    assert other["exact_match_rate"] == 0.0
    assert other["approx_match_rate"] == 0.0
    assert other["by_duplication"]["1x"]["longest_prefix_max"] == 0


def test_the_audit_applies_the_bleu_threshold_to_decoded_continuations(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    record = _record(0, "1x", make_sentences)
    suffix = tokenizer(record["text"])["input_ids"][-SUFFIX:]
    reference = _text(tokenizer, suffix)
    corrupted = [suffix[: SUFFIX - k] + [_junk(tokenizer)] * k for k in range(SUFFIX)]
    scores = [sentence_bleu(_text(tokenizer, c), reference) for c in corrupted]
    k = next(k for k in range(SUFFIX) if scores[k] < 0.75)
    plan = AuditPlan(prefixes=(10,), exposure_candidates=8)

    above = run_audit(ScriptedModel(corrupted[k - 1]), tokenizer, [record], plan=plan).continuations[0]
    below = run_audit(ScriptedModel(corrupted[k]), tokenizer, [record], plan=plan).continuations[0]
    lenient = AuditOptions(bleu_threshold=scores[k])
    at_site = run_audit(ScriptedModel(corrupted[k]), tokenizer, [record], plan=plan, options=lenient).continuations[0]

    assert above.bleu >= 0.75
    assert above.approx
    assert not above.exact
    assert below.bleu < 0.75
    assert not below.approx
    assert at_site.approx  # the threshold is the site's option, not the run's plan


def test_the_summary_reports_each_group_beside_the_controls(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    groups: list[Group] = ["10x", "10x", "1x", "1x", "control", "control"]
    records = [_record(i, g, make_sentences) for i, g in enumerate(groups)]
    memorised = [tokenizer(r["text"])["input_ids"] for r in records[:3]]  # both 10x, one 1x
    model = MemorisingModel(memorised, _junk(tokenizer))

    summary = run_audit(model, tokenizer, records, plan=AuditPlan(prefixes=(10, 50))).summary()

    by = summary["by_duplication"]
    assert [by[g]["exact_match_rate"] for g in ("10x", "1x", "control")] == [1.0, 0.5, 0.0]
    assert [by[g]["pii_extraction_rate"] for g in ("10x", "1x", "control")] == [1.0, 0.5, 0.0]
    assert [by[g]["mean_exposure"] for g in ("10x", "1x", "control")] == [7.0, 3.5, 0.0]
    assert [by[g]["worst_exposure"] for g in ("10x", "1x", "control")] == [7.0, 7.0, 0.0]
    # Every candidate scores the same (-100): nothing to fit, so the extrapolation is the rank.
    assert [by[g]["mean_exposure_extrapolated"] for g in ("10x", "1x", "control")] == [7.0, 3.5, 0.0]
    assert [by[g]["worst_exposure_extrapolated"] for g in ("10x", "1x", "control")] == [7.0, 7.0, 0.0]
    assert [by[g]["count"] for g in ("10x", "1x", "control")] == [2, 2, 2]
    assert by["1x"]["pii_secrets"] == 6
    assert summary["exact_match_rate"] == 0.75  # trained canaries: 3 of 4
    assert summary["pii_extraction_rate"] == 0.75
    assert summary["mean_exposure"] == pytest.approx(7.0 * 3 / 4)
    assert summary["mean_exposure_extrapolated"] == pytest.approx(7.0 * 3 / 4)
    assert summary["by_prefix"]["50"]["1x"]["exact_match_rate"] == 0.5
    assert summary["by_prefix"]["10"]["control"]["max_token_accuracy"] < 1.0


def test_extrapolated_exposure_goes_past_the_ranks_ceiling_for_a_memorised_secret_and_not_for_a_control(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    groups: list[Group] = ["10x", "10x", "control", "control"]
    records = [_record(i, g, make_sentences) for i, g in enumerate(groups)]
    model = SpreadModel([tokenizer(r["text"])["input_ids"] for r in records[:2]], _junk(tokenizer))
    plan = AuditPlan(prefixes=(10,), exposure_candidates=64)

    report = run_audit(model, tokenizer, records, plan=plan)

    by = report.summary()["by_duplication"]
    ceiling = math.log2(candidate_space(records[0]["secrets"]["record_id"]))  # 10^8 values: 26.6 bits
    assert [e.exposure for e in report.exposures if e.group == "10x"] == [6.0, 6.0]  # ranked first of 64
    assert by["10x"]["mean_exposure_extrapolated"] == pytest.approx(ceiling)  # 0 against -50 ± 3: 17 sd past
    assert by["10x"]["worst_exposure_extrapolated"] == pytest.approx(ceiling)
    assert 0.0 <= by["control"]["worst_exposure_extrapolated"] < 6.0  # a draw among draws
    assert by["control"]["exposure_count"] == 2


def test_prefixes_too_long_for_a_record_are_skipped(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    record = _record(0, "1x", make_sentences)
    length = len(tokenizer(record["text"])["input_ids"])
    fits, too_long = length - SUFFIX, length - SUFFIX + 1

    report = run_audit(ScriptedModel([0] * SUFFIX), tokenizer, [record], plan=AuditPlan(prefixes=(10, fits, too_long)))

    assert sorted(c.prefix for c in report.continuations) == [10, fits]
    skipped = report.summary()["by_prefix"][str(too_long)]["1x"]
    assert skipped["count"] == 0
    assert skipped["exact_match_rate"] is None


def test_the_audit_never_logs_or_summarises_record_text_or_secrets(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    records = [_record(i, g, make_sentences) for i, g in enumerate(THREE_GROUPS)]
    model = MemorisingModel([tokenizer(r["text"])["input_ids"] for r in records], _junk(tokenizer))

    with structlog.testing.capture_logs() as logs:
        summary = json.dumps(run_audit(model, tokenizer, records, plan=AuditPlan(prefixes=(10,))).summary())

    assert logs  # the audit does log, only not the records
    emitted = json.dumps(logs, default=str) + summary
    for record in records:
        assert all(value not in emitted for value in record["secrets"].values())
        assert all(line[:20] not in emitted for line in record["text"].splitlines() if len(line) >= 20)


def test_the_audit_decodes_with_the_plans_frequency_penalty_and_says_so_in_its_summary(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    records = [_record(i, g, make_sentences) for i, g in enumerate(THREE_GROUPS)]
    model = RecordingModel()

    report = run_audit(model, tokenizer, records, plan=AuditPlan(prefixes=(10,), frequency_penalty=1.0))

    assert model.penalties
    assert set(model.penalties) == {1.0}
    assert report.summary()["config"]["frequency_penalty"] == 1.0


def test_exposure_scores_the_secret_at_its_first_occurrence_given_only_the_text_before_it(
    tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    record = _record(0, "1x", make_sentences)
    secret = record["secrets"]["record_id"]
    record["text"] += f" See {secret} again."  # a second occurrence, at the end
    start = record["text"].index(secret)
    model = RecordingModel()

    report = run_audit(model, tokenizer, [record], plan=AuditPlan(prefixes=(10,), exposure_candidates=8))

    assert [e.candidates for e in report.exposures] == [8]
    assert len(model.scored) == 8
    texts = [_text(tokenizer, ids) for ids, _ in model.scored]
    values = [text[start:] for text in texts]
    assert values[0] == secret
    assert len(set(values)) == 8
    assert all(re.fullmatch(r"MRN-\d{4}-\d{4}", v) for v in values)
    for (ids, flags), value in zip(model.scored, values, strict=True):
        assert _text(tokenizer, ids) == record["text"][:start] + value  # nothing after the first occurrence
        spelled = [i for i, flag in enumerate(flags) if flag]
        assert spelled == list(range(spelled[0], len(ids)))  # the secret's tokens, the last ones
        assert value in _text(tokenizer, ids[spelled[0] :])
        assert value not in _text(tokenizer, ids[: spelled[0] + 1])
    whole = tokenizer(record["text"])["input_ids"]
    assert model.scored[0][0] == whole[: len(model.scored[0][0])]  # tokens as training saw them


def test_load_canaries_names_the_file_and_line_of_a_bad_record(tmp_path: Path) -> None:
    good = _record(0, "1x", lambda count, seed: ["a b c."])
    path = tmp_path / "canaries.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "group": "2x"}) + "\n")

    with pytest.raises(DataError, match=r"canaries\.jsonl row 3: field 'group' is not one of 1x, 10x, control$"):
        load_canaries([path])
    path.write_text(json.dumps(good) + "\n")
    assert load_canaries([path]) == [good]


# --------------------------------------------------------------------------- the frequency penalty

LOGITS = (0.0, 3.0, 1.5, 0.25)  # binary fractions: every penalised score below is exact, no two tie


def test_without_a_penalty_greedy_decoding_repeats_the_favourite_token() -> None:
    model = FixedLogits(LOGITS)

    plain = greedy_decode(model, [[3]], max_new_tokens=6, pad_id=0)
    zero = greedy_decode(model, [[3]], max_new_tokens=6, pad_id=0, frequency_penalty=0.0)

    assert plain == zero == [[1] * 6]


def test_a_frequency_penalty_moves_greedy_decoding_off_a_repeated_token() -> None:
    model = FixedLogits(LOGITS)

    decoded = greedy_decode(model, [[3]], max_new_tokens=6, pad_id=0, frequency_penalty=1.0)[0]

    # Token 1 leads token 2 by 3.0 - 1.5: after two picks its score 3.0 - 2 * 1.0 falls below 1.5.
    assert decoded[:3] == [1, 1, 2]
    assert decoded == _penalised_greedy(LOGITS, 1.0, 6)


def test_the_frequency_penalty_counts_generated_tokens_not_the_prompt_or_its_padding() -> None:
    model = FixedLogits(LOGITS)
    prompts = [[1, 1, 1, 1], [3], [2, 1, 2]]  # the favourite four times, never, once; padded with it

    decoded = greedy_decode(model, prompts, max_new_tokens=6, pad_id=1, batch_size=3, frequency_penalty=1.0)

    # Had the prompt's four 1s counted, the first prompt would start with 2 (3.0 - 4.0 < 1.5).
    assert decoded == [_penalised_greedy(LOGITS, 1.0, 6)] * 3


# --------------------------------------------------------------------------- the real tiny model


@pytest.mark.usefixtures("single_threaded_torch")
def test_batched_greedy_decoding_with_left_padding_matches_decoding_one_by_one(
    tiny_base_model: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)  # in eval mode
    prompts = [tokenizer(text)["input_ids"][: 3 + 7 * i] for i, text in enumerate(make_sentences(6, 5) * 2)]
    pad = tokenizer.pad_token_id

    batched = greedy_decode(model, prompts, max_new_tokens=12, pad_id=pad, batch_size=4)
    alone = [greedy_decode(model, [p], max_new_tokens=12, pad_id=pad, batch_size=1)[0] for p in prompts]

    assert batched == alone
    with torch.inference_mode():  # and the KV cache changes nothing: recompute every step from scratch
        ids = list(prompts[-1])
        for _ in range(12):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert alone[-1] == ids[len(prompts[-1]) :]


@pytest.mark.usefixtures("single_threaded_torch")
def test_penalised_batched_decoding_matches_the_penalty_applied_token_by_token_without_the_cache(
    tiny_base_model: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)  # in eval mode
    prompts = [tokenizer(text)["input_ids"][: 3 + 7 * i] for i, text in enumerate(make_sentences(6, 5))]
    pad = tokenizer.pad_token_id

    plain = greedy_decode(model, prompts, max_new_tokens=12, pad_id=pad, batch_size=4)
    zero = greedy_decode(model, prompts, max_new_tokens=12, pad_id=pad, batch_size=4, frequency_penalty=0.0)
    penalised = greedy_decode(model, prompts, max_new_tokens=12, pad_id=pad, batch_size=4, frequency_penalty=1.0)

    assert zero == plain
    assert penalised != plain  # the untrained model repeats itself, so the penalty has work to do
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, penalised, strict=True):
            ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
            for _ in range(12):
                token = int((model(input_ids=torch.tensor([ids])).logits[0, -1] - 1.0 * counts).argmax())
                counts[token] += 1
                ids.append(token)
            assert tokens == ids[len(prompt) :]


@pytest.mark.usefixtures("single_threaded_torch")
def test_log_likelihoods_sum_the_flagged_tokens_whatever_the_padding(
    tiny_base_model: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)  # in eval mode
    sequences = [tokenizer(text)["input_ids"] for text in make_sentences(5, 9)]
    flags = [[i % 2 == 1 for i in range(len(s))] for s in sequences]

    batched = log_likelihoods(model, sequences, flags, pad_id=tokenizer.pad_token_id, batch_size=5)

    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([sequences[0]])).logits[0], -1)
    expected = sum(float(logp[i - 1, sequences[0][i]]) for i in range(1, len(sequences[0])) if flags[0][i])
    assert batched[0] == pytest.approx(expected, rel=1e-4)
    assert all(math.isfinite(x) and x < 0 for x in batched)
    assert batched == pytest.approx(
        [
            log_likelihoods(model, [s], [f], pad_id=tokenizer.pad_token_id)[0]
            for s, f in zip(sequences, flags, strict=True)
        ],
        rel=1e-4,
    )


@pytest.mark.usefixtures("single_threaded_torch")
def test_shared_prefix_scoring_with_the_kv_cache_equals_scoring_each_whole_sequence_without_it(
    tiny_base_model: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)  # in eval mode
    prefix = tokenizer(make_sentences(1, 11)[0])["input_ids"]
    tails = [
        tokenizer(text, add_special_tokens=False)["input_ids"][: 1 + i % 6]
        for i, text in enumerate(make_sentences(9, 12))
    ]
    sequences = [prefix + tail for tail in tails]
    flags = [[i >= len(prefix) - 2 and i % 3 != 1 for i in range(len(s))] for s in sequences]  # prefix tokens too
    pad = tokenizer.pad_token_id

    fast = shared_prefix_log_likelihoods(model, sequences, flags, pad_id=pad, batch_size=2)  # widths 1 to 6

    with torch.inference_mode():
        expected = []
        for sequence, flag in zip(sequences, flags, strict=True):
            logp = torch.log_softmax(model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0].float(), -1)
            expected.append(sum(float(logp[i - 1, sequence[i]]) for i in range(1, len(sequence)) if flag[i]))
    assert fast == pytest.approx(expected, abs=1e-4)
    assert all(x < 0 for x in fast)
    unrelated = [sequences[0], sequences[1][1:]]  # no common prefix: plain batched scoring
    assert shared_prefix_log_likelihoods(model, unrelated, [flags[0], flags[1][1:]], pad_id=pad) == pytest.approx(
        log_likelihoods(model, unrelated, [flags[0], flags[1][1:]], pad_id=pad), abs=1e-4
    )


@pytest.mark.usefixtures("single_threaded_torch")
def test_audit_model_runs_a_real_model_and_restores_its_mode(
    tiny_base_model: Path, tokenizer: PreTrainedTokenizerBase, make_sentences: Callable[[int, int], list[str]]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model).train()
    records = [_record(i, g, make_sentences) for i, g in enumerate(THREE_GROUPS)]

    report = audit_model(model, tokenizer, records, plan=AuditPlan(prefixes=(10, 50), exposure_candidates=32))

    assert model.training
    assert len(report.continuations) == 6
    assert all(0.0 <= e.exposure <= 5.0 and e.candidates == 32 for e in report.exposures)
    ceiling = math.log2(candidate_space(records[0]["secrets"]["record_id"]))  # same format in every record
    assert all(0.0 <= e.exposure_extrapolated <= ceiling for e in report.exposures)
    assert len(report.exposures) == 3


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def site(tmp_path: Path) -> Path:
    paths = write_site(tmp_path / "site", generate_site("clinical", DataSpec(n_train=1, n_canaries=2, n_controls=1)))
    return paths.root


@pytest.mark.usefixtures("single_threaded_torch")
def test_the_cli_audits_a_saved_model_and_adapter(
    tiny_base_model: Path, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adapter))
    out = tmp_path / "audit" / "summary.json"
    argv = ["audit", "--base", str(tiny_base_model), "--adapter", str(adapter), "--out", str(out)]
    argv += ["--records", str(site / "canaries.jsonl"), "--records", str(site / "controls.jsonl")]

    code = lab_main([*argv, "--prefixes", "10,50", "--candidates", "8", "--frequency-penalty", "1.0"])

    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert code == 0
    assert summary["records"] == {"control": 1, "1x": 1, "10x": 1}
    assert set(summary["by_prefix"]) == {"10", "50"}
    assert summary["config"]["frequency_penalty"] == 1.0
    for group in ("control", "1x", "10x"):  # 8 candidates: too few to fit, so the extrapolation is the rank
        rates = summary["by_duplication"][group]
        assert rates["mean_exposure"] is not None
        assert rates["mean_exposure_extrapolated"] == rates["mean_exposure"]
        assert rates["worst_exposure_extrapolated"] == rates["worst_exposure"]
    assert printed.splitlines()[0].split()[:3] == ["group", "prefix", "n"]
    assert printed.splitlines()[0].split()[-2:] == ["exposure", "extrapolated"]
    assert len(printed.splitlines()) == 1 + 3 * 3
    for record in load_canaries([site / "canaries.jsonl", site / "controls.jsonl"]):
        assert all(value not in printed + out.read_text() for value in record["secrets"].values())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"--base": "/nonexistent/model"}, "--base /nonexistent/model"),
        ({"--records": "/nonexistent/canaries.jsonl"}, "--records /nonexistent/canaries.jsonl"),
        ({"--adapter": "/nonexistent/adapter"}, "--adapter /nonexistent/adapter"),
        ({"--prefixes": "10,x"}, "--prefixes"),
        ({"--frequency-penalty": "-1"}, "--frequency-penalty"),
        ({"--frequency-penalty": "11"}, "frequency_penalty"),
    ],
)
def test_the_cli_exits_2_with_one_line_on_a_bad_path_or_argument(
    tiny_base_model: Path, site: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], named: str
) -> None:
    args = {"--base": str(tiny_base_model), "--records": str(site / "canaries.jsonl"), **change}

    with pytest.raises(SystemExit) as exited:  # argparse errors exit; path errors return
        raise SystemExit(lab_main(["audit", *[x for pair in args.items() for x in pair]]))

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert named in err
    assert err.count("\n") == 1
