"""Failover that keeps one answer (issue #9): ``core.continuation`` plans the
next attempt as a continuation of the answer so far, and the stand-in
continues a prefilled answer as greedy decoding would. Together: an answer
cut after any token and continued elsewhere is the one whole answer."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings, strategies as st

from p2pgpu.core.continuation import ContinuationKind, Work, plan_continuation
from p2pgpu.core.jobparams import JobParams, MessageExtra
from p2pgpu.core.jobs import MAX_BODY, prompt_token_bound
from p2pgpu.testing.ollama_standin import expected_completion, split_prefill

MODEL = "llama3.2:1b"

prompts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
roles = st.sampled_from(["system", "user", "assistant"])
chats = st.lists(st.tuples(roles, prompts), min_size=1, max_size=4).filter(lambda m: m[-1][0] != "assistant")


def _as_chat(messages) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def _what_the_model_reads(work: Work):
    return work.prompt if work.messages is None else _as_chat(work.messages)


@settings(max_examples=60, deadline=None)
@given(prompt=prompts, chat=chats, use_chat=st.booleans(), max_tokens=st.integers(2, 40), data=st.data())
def test_an_answer_cut_after_any_token_and_continued_is_the_whole_answer(prompt, chat, use_chat, max_tokens, data):
    original = Work(None, tuple(chat), max_tokens, None) if use_chat else Work(prompt, None, max_tokens, None)
    whole = expected_completion(MODEL, _what_the_model_reads(original), num_predict=max_tokens)
    cut = data.draw(st.integers(1, max_tokens - 1))
    delivered = "".join(whole.tokens[:cut])

    plan = plan_continuation(original, delivered, cut, paid=0)

    assert plan.kind is ContinuationKind.CONTINUE
    assert plan.work.prompt is None and plan.work.messages[-1] == ("assistant", delivered)
    assert plan.work.max_tokens == max_tokens - cut
    rest = expected_completion(MODEL, _as_chat(plan.work.messages), num_predict=plan.work.max_tokens)
    assert delivered + rest.text == whole.text
    # the hold of the next attempt covers the longer prompt
    assert plan.work.prompt_tokens_bound >= prompt_token_bound(original.prompt, original.messages)


def test_a_users_own_prefill_is_extended_not_repeated():
    original = Work(None, (("user", "write a haiku"), ("assistant", "Autumn")), 20, None)
    plan = plan_continuation(original, " leaves fall", 2, paid=0)
    assert plan.work.messages == (("user", "write a haiku"), ("assistant", "Autumn leaves fall"))
    assert plan.work.max_tokens == 18


def test_nothing_delivered_sends_the_same_request_with_the_budget_left():
    original = Work("hi", None, 10, 1_000)
    plan = plan_continuation(original, "", 0, paid=300)
    assert plan.kind is ContinuationKind.SAME and plan.work == Work("hi", None, 10, 700)


def test_every_token_delivered_means_the_answer_is_whole():
    plan = plan_continuation(Work("hi", None, 3, None), "a b c", 3, paid=5)
    assert plan.kind is ContinuationKind.WHOLE


def test_a_spent_budget_ends_the_job():
    plan = plan_continuation(Work("hi", None, 30, 500), "a b", 2, paid=500)
    assert plan.kind is ContinuationKind.NO_BUDGET


def test_an_answer_too_long_for_a_request_is_not_continued():
    plan = plan_continuation(Work("hi", None, 1 << 20, None), "x" * MAX_BODY, 200_000, paid=0)
    assert plan.kind is ContinuationKind.TOO_LONG


def test_the_price_budget_left_shrinks_by_what_was_paid():
    plan = plan_continuation(Work("hi", None, 30, 1_000), "Hello", 1, paid=250)
    assert plan.kind is ContinuationKind.CONTINUE and plan.work.max_price == 750


# ---------------------------------------------------------------- the stand-in


def test_a_chat_of_one_user_message_is_answered_as_the_generate_prompt():
    chat = expected_completion(MODEL, [{"role": "user", "content": "why?"}], num_predict=9)
    assert chat.tokens == expected_completion(MODEL, "why?", num_predict=9).tokens


def test_a_prefix_the_model_would_not_have_said_gets_a_reply_to_the_whole_chat():
    chat = [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "Because zebra"}]
    assert split_prefill(chat) == (chat[:1], "Because zebra")
    reply = expected_completion(MODEL, chat, num_predict=8)
    whole = expected_completion(MODEL, chat[:1], num_predict=16)
    assert not whole.text.startswith("Because zebra")
    assert reply.eval_count == 8 and reply.text != whole.text[: len(reply.text)]


def test_an_empty_assistant_message_is_not_a_prefill():
    chat = [{"role": "user", "content": "why?"}, {"role": "assistant", "content": ""}]
    assert split_prefill(chat) == (chat, "")


# ------------------------------------------------------------------ params and embeddings

PNG = "iVBORw0KGgo="
SAMPLING = JobParams(options=(("seed", 7), ("temperature", 0.25)), think=True, format="json")


def test_a_continuation_keeps_the_jobs_params_and_moves_a_prompts_images_onto_its_message():
    original = Work("describe it", None, 20, None, replace(SAMPLING, images=(PNG,)))
    plan = plan_continuation(original, "It is a", 3, paid=0)
    assert plan.kind is ContinuationKind.CONTINUE
    assert plan.work.messages == (("user", "describe it"), ("assistant", "It is a"))
    assert plan.work.params == replace(SAMPLING, message_extras=((0, MessageExtra(images=(PNG,))),))
    assert plan.work.max_tokens == 17
    assert plan.work.body()  # a body the job codec takes
    # a chat's extras stay on their messages (the answer is appended after them)
    extras = ((1, MessageExtra(images=(PNG,))),)
    chat = Work(None, (("system", "s"), ("user", "look")), 20, None, JobParams(message_extras=extras))
    continued = plan_continuation(chat, "A cat", 2, paid=0).work
    assert continued.messages[-1] == ("assistant", "A cat") and continued.params.message_extras == extras


def test_nothing_delivered_on_the_content_channel_runs_the_same_request_again():
    original = Work("think first", None, 20, 100, SAMPLING)
    plan = plan_continuation(original, "", 4, paid=10)  # four thinking tokens, no answer yet
    assert plan.kind is ContinuationKind.SAME and plan.work == replace(original, max_price=90)


def test_an_embed_job_continues_with_the_inputs_not_yet_embedded():
    original = Work(None, None, 4, 50, JobParams(dimensions=64), ("a", "b", "c", "d"))
    assert original.kind == "embed" and original.prompt_tokens_bound == prompt_token_bound(inputs=("a", "b", "c", "d"))
    plan = plan_continuation(original, "", 3, paid=20)
    assert plan.kind is ContinuationKind.CONTINUE
    assert plan.work == Work(None, None, 1, 30, JobParams(dimensions=64), ("d",))
    assert plan_continuation(original, "", 0, paid=0).kind is ContinuationKind.SAME
    assert plan_continuation(original, "", 4, paid=20).kind is ContinuationKind.WHOLE
    assert plan_continuation(original, "", 2, paid=50).kind is ContinuationKind.NO_BUDGET
