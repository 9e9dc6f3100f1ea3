"""The simulator, end to end through the litellm backend and a real local fake LLM server."""

from __future__ import annotations

import json
import threading

import anyio
import pytest

from engine import LiteLLMBackend, LLMSimulatedUser, StopReason, UserTurn, prepare_simulation, simulate
from engine.llm.base import LLMSettings
from engine.simulation.user import KICKOFF, SIMULATED_USER_PROMPT
from engine.simulation.offline_user import as_user_speech, goal_steps
from tests.conftest import ROOT, agent
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.anyio


def turn(message="", goal_achieved=False, end=False, reason="r") -> dict:
    return {"message": message, "goal_achieved": goal_achieved, "end_conversation": end, "reason": reason}


def llm_for(fake) -> LiteLLMBackend:
    return LiteLLMBackend(LLMSettings(model="openai/fake-user", api_base=fake.url, api_key="test-key",
                                      max_retries=2, backoff_s=0.01, timeout_s=10))


async def run(store, fake, cases, target=agent("echo"), **options):
    options.setdefault("max_turns", 5)
    return await simulate(store, target, cases, llm=llm_for(fake), workspace=ROOT, **options)


async def test_one_llm_call_per_simulated_turn(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="next question"))
    summary = await run(store, fake_llm, [{"goal": "g"}], max_turns=4)
    assert summary.sessions[0].stop_reason == StopReason.MAX_TURNS
    assert summary.turns_done == 4
    assert fake_llm.calls == 4  # counted at the server: no separate goal-check call
    assert summary.usage["simulated_user"].calls == 4


async def test_goal_decision_comes_with_the_same_call_that_writes_messages(store, fake_llm):
    fake_llm.queue(turn(message="hello"), turn(message="more"), turn(goal_achieved=True, reason="got it"))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    s = summary.sessions[0]
    assert (s.stop_reason, s.turns, s.stop_detail) == (StopReason.GOAL_ACHIEVED, 2, "got it")
    assert fake_llm.calls == 3


async def test_user_ending_is_recorded(store, fake_llm):
    fake_llm.queue(turn(message="hello"), turn(end=True, reason="gave up"))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    assert summary.sessions[0].stop_reason == StopReason.USER_ENDED


async def test_simulated_user_sees_flipped_structured_messages(store, fake_llm):
    fake_llm.queue(turn(message="first"), turn(message="second"), turn(goal_achieved=True))
    await run(store, fake_llm, [{"goal": "Book a table", "persona": "A terse chef",
                                 "simulation_guidelines": ["Never give your phone number"]}])
    last = fake_llm.requests[-1]["messages"]
    system = last[0]["content"]
    assert "Book a table" in system and "A terse chef" in system and "Never give your phone number" in system
    assert [(m["role"], m["content"]) for m in last[1:]] == [
        ("user", KICKOFF),
        ("assistant", "first"), ("user", "You said: first"),
        ("assistant", "second"), ("user", "You said: second"),
    ]
    # the conversation is not pasted into the prompt text
    assert "You said" not in system
    assert fake_llm.requests[-1]["response_format"]["type"] == "json_schema"


async def test_default_persona_when_none_given(store, fake_llm):
    fake_llm.queue(turn(message="hi"), turn(goal_achieved=True))
    await run(store, fake_llm, [{"goal": "g"}])
    assert "ordinary, polite user" in fake_llm.requests[0]["messages"][0]["content"]


async def test_scripted_turns_are_sent_verbatim_before_the_model_takes_over(store, fake_llm):
    fake_llm.queue(turn(message="model-written"), turn(goal_achieved=True))
    summary = await run(store, fake_llm, [{"goal": "g", "scripted_turns": ["script one", "script two"]}])
    session = await store.get_session(summary.sessions[0].session_id)
    users = [(m.content, m.scripted) for m in session.messages if m.role == "user"]
    assert users == [("script one", True), ("script two", True), ("model-written", False)]
    assert fake_llm.calls == 2


async def test_agent_crash_keeps_the_turns_before_it(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="again"))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("crashes_on_turn_2"))
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.AGENT_ERROR
    assert "KeyError" in s.stop_detail and "gift_card" in s.error
    session = await store.get_session(s.session_id)
    assert [(m.role, m.turn) for m in session.messages] == [("user", 1), ("assistant", 1), ("user", 2), ("assistant", 2)]
    assert session.messages[1].content == "first reply is fine"
    assert session.messages[3].error and session.messages[3].content is None


async def test_agent_timeout_ends_with_agent_error(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="hi"))
    summary = await run(store, fake_llm, [{"goal": "g"}], target={"path": agent("slow"), "timeout_s": 0.3})
    assert summary.sessions[0].stop_reason == StopReason.AGENT_ERROR
    assert "within 0.3s" in summary.sessions[0].stop_detail


async def test_empty_agent_reply_ends_with_agent_empty(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="hi"))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("empty_reply"))
    assert summary.sessions[0].stop_reason == StopReason.AGENT_EMPTY
    assert summary.sessions[0].turns == 1


async def test_model_failure_ends_with_simulator_error_and_keeps_turns(store, fake_llm):
    fake_llm.queue(turn(message="hi"), FakeReply(status=401, content="bad key"))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.SIMULATOR_ERROR
    assert "bad key" in s.stop_detail and "test-key" not in s.stop_detail
    assert s.turns == 1 and s.last_agent_reply == "You said: hi"


async def test_rate_limits_are_retried_honouring_retry_after(store, fake_llm):
    fake_llm.queue(FakeReply(status=429, headers={"Retry-After": "0"}), FakeReply(status=500),
                   turn(message="hi"), turn(goal_achieved=True))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    assert summary.sessions[0].stop_reason == StopReason.GOAL_ACHIEVED
    assert fake_llm.calls == 4
    assert summary.usage["simulated_user"].calls == 4  # failed attempts are counted too


async def test_invalid_json_gets_one_repair_retry(store, fake_llm):
    fake_llm.queue("not json at all", turn(message="hi"), turn(goal_achieved=True))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    assert summary.sessions[0].stop_reason == StopReason.GOAL_ACHIEVED
    repair = fake_llm.requests[1]["messages"][-1]["content"]
    assert "could not be used" in repair


async def test_persistently_invalid_output_is_a_simulator_error(store, fake_llm):
    fake_llm.set_handler(lambda req: "still not json")
    summary = await run(store, fake_llm, [{"goal": "g"}])
    assert summary.sessions[0].stop_reason == StopReason.SIMULATOR_ERROR
    assert "did not return a valid UserTurn" in summary.sessions[0].stop_detail
    assert fake_llm.calls == 2


async def test_token_usage_is_summed_per_session_and_run(store, fake_llm):
    fake_llm.queue(FakeReply(content=turn(message="a"), prompt_tokens=100, completion_tokens=10),
                   FakeReply(content=turn(goal_achieved=True), prompt_tokens=150, completion_tokens=5))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    u = summary.usage["simulated_user"]
    assert (u.calls, u.prompt_tokens, u.completion_tokens) == (2, 250, 15)
    session = await store.get_session(summary.sessions[0].session_id)
    assert session.messages[0].usage.prompt_tokens == 100


async def test_repeats_make_separate_sessions_with_unique_sim_ids(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(goal_achieved=True) if len(req["messages"]) > 2 else turn(message="hi"))
    summary = await run(store, fake_llm, [{"goal": "a"}, {"goal": "b"}], repeats=3)
    ids = [s.session_id for s in summary.sessions]
    assert len(ids) == len(set(ids)) == 6
    assert all(i.startswith("sim-") for i in ids)
    assert sorted((s.case_index, s.repeat) for s in summary.sessions) == [(c, r) for c in (0, 1) for r in range(3)]


async def test_conversations_run_concurrently(store, fake_llm):
    """The second turns of all 8 conversations are at the model together (no timing: a barrier at the fake; the
    first turns wait for one first answer, the credentials check)."""
    second_turns = threading.Barrier(8, timeout=20)

    def handle(request):
        if sum(m["role"] == "assistant" for m in request["messages"]) == 1:
            second_turns.wait()  # raises, so the call fails, unless all 8 such calls are in flight at once
        return turn(message="hi")
    fake_llm.set_handler(handle)
    summary = await run(store, fake_llm, [{"goal": f"g{i}"} for i in range(8)], max_turns=2, concurrency=8)
    assert [s.stop_reason for s in summary.sessions] == [StopReason.MAX_TURNS] * 8 and not fake_llm.errors


async def test_cancelled_run_keeps_completed_turns(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="hi"))
    job = await prepare_simulation(store, {"path": agent("slow"), "timeout_s": 30}, [{"goal": "g"}],
                                   llm=llm_for(fake_llm), max_turns=5, workspace=ROOT)
    with anyio.move_on_after(2.5):  # the slow agent answers turn 1 after 2 s, then is mid-turn 2
        await job.run()
    summary = await job.store.get_session((await store.get_sessions(job.run_id))[0].id)
    assert summary.stop_reason == StopReason.CANCELLED
    assert [m.role for m in summary.messages][:2] == ["user", "assistant"]
    assert summary.messages[1].content == "too late"
    run = await store.get_run(job.run_id)
    assert run["status"] == "cancelled"


async def test_custom_user_class_replaces_the_default(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(goal_achieved=True))
    summary = await run(store, fake_llm, [{"goal": "reset my password"}], user_agent="tests.test_simulator:ImpatientUser")
    session = await store.get_session(summary.sessions[0].session_id)
    assert session.messages[0].content == "I need help RIGHT NOW: reset my password"
    assert "one short sentence" in fake_llm.requests[0]["messages"][0]["content"]


class ImpatientUser(LLMSimulatedUser):
    extra_guidelines = ["You are in a hurry: one short sentence per message."]

    async def next_turn(self, context):
        if context.is_first_turn:
            return UserTurn(message=f"I need help RIGHT NOW: {context.goal}")
        return await super().next_turn(context)


# --- offline backend ----------------------------------------------------------------------------


async def test_offline_user_reveals_the_goal_gradually_and_says_it_is_heuristic(store):
    goal = "Introduce yourself as Dana. Ask about the returns policy. Ask whether the assistant remembers your name."
    summary = await simulate(store, agent("echo"), [{"goal": goal}], model="offline", workspace=ROOT, max_turns=6)
    assert summary.offline and summary.model == "offline" and "heuristic" in summary.note
    session = await store.get_session(summary.sessions[0].session_id)
    users = [m.content for m in session.messages if m.role == "user"]
    assert users == ["Hi, my name is Dana.", "Could you help me with the returns policy?", "Do you remember my name?"]
    assert session.stop_reason == StopReason.GOAL_ACHIEVED


def test_offline_speech_transforms():
    assert goal_steps("Do A. Then do B; finally C!") == ["Do A", "Then do B", "finally C!"]
    assert as_user_speech("Get a refund for order A1234") == "I'd like to get a refund for order A1234."
    assert as_user_speech("Introduce yourself as Sam") == "Hi, my name is Sam."


async def test_offline_run_is_deterministic(store):
    cases = [{"goal": "Check order A1234. Ask about shipping times."}]
    a = await simulate(store, agent("echo"), cases, model="offline", workspace=ROOT)
    b = await simulate(store, agent("echo"), cases, model="offline", workspace=ROOT)
    ta = [m.content for m in (await store.get_session(a.sessions[0].session_id)).messages]
    tb = [m.content for m in (await store.get_session(b.sessions[0].session_id)).messages]
    assert ta == tb


def test_prompt_is_a_reviewed_constant_with_placeholders():
    assert {"{goal}", "{persona}", "{guidelines}"} <= {p for p in ("{goal}", "{persona}", "{guidelines}") if p in SIMULATED_USER_PROMPT}
    json.loads(json.dumps(SIMULATED_USER_PROMPT))


# --- model failures -----------------------------------------------------------------------------


async def test_a_reply_of_the_wrong_shape_is_a_simulator_error_naming_the_fields(store, fake_llm):
    fake_llm.set_handler(lambda req: {"totally": "wrong"})
    summary = await run(store, fake_llm, [{"goal": "g"}])
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.SIMULATOR_ERROR and s.turns == 0
    assert "goal_achieved: Field required" in s.stop_detail and "totally: Extra inputs" in s.stop_detail
    assert fake_llm.calls == 2  # the call and one repair retry
    u = summary.usage["simulated_user"]
    assert (u.calls, u.failed_calls, u.failures) == (2, 2, {"invalid_output": 2})


async def test_failed_attempts_are_counted_in_session_and_run_usage(store, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=500, content="upstream down"))
    summary = await run(store, fake_llm, [{"goal": "g"}])
    session = await store.get_session(summary.sessions[0].session_id)
    assert session.stop_reason == StopReason.SIMULATOR_ERROR and fake_llm.calls == 3  # max_retries=2
    for u in (session.usage["simulated_user"], summary.usage["simulated_user"]):
        assert (u.calls, u.failed_calls, u.failures) == (3, 3, {"server_error": 3})


async def test_a_refused_key_stops_the_whole_run_after_one_request(store, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="Incorrect API key provided"))
    summary = await run(store, fake_llm, [{"goal": f"g{i}"} for i in range(5)], concurrency=5)
    assert fake_llm.calls == 1
    assert summary.status == "failed"
    assert "openai/fake-user" in summary.error and "CONVSIM_API_KEY" in summary.error
    assert summary.stop_reasons == {"simulator_error": 5}  # never cancelled, never the agent's fault
    assert all(s.stop_detail and "CONVSIM_API_KEY" in s.stop_detail for s in summary.sessions)
    assert "test-key" not in summary.error


async def test_a_key_refused_mid_run_ends_the_other_sessions_as_simulator_errors(store, fake_llm):
    def reply(req):
        if len(req["messages"]) > 4:  # the third turn of any session
            return FakeReply(status=401, content="key revoked")
        return FakeReply(content=turn(message="next"), delay_s=0.05)

    fake_llm.set_handler(reply)
    summary = await run(store, fake_llm, [{"goal": f"g{i}"} for i in range(6)], concurrency=2)
    assert summary.status == "failed" and "key revoked" in summary.error
    assert set(summary.stop_reasons) == {"simulator_error"}
    details = sorted(s.stop_detail.split(":")[0] for s in summary.sessions)
    assert "not run" in details  # sessions that never started say so
    assert fake_llm.calls <= 2 * 2 + 2  # two turns of the two running sessions, then one refusal each at most


async def test_a_too_long_conversation_leaves_out_old_turns_and_says_so(store, fake_llm):
    limit = 800  # characters of conversation (the system prompt aside): about three turns

    def reply(req):
        if sum(len(m["content"] or "") for m in req["messages"][1:]) > limit:
            return FakeReply.context_length_exceeded()
        return turn(message="x" * 150)

    fake_llm.set_handler(reply)
    summary = await run(store, fake_llm, [{"goal": "g"}], max_turns=6)
    assert summary.sessions[0].stop_reason == StopReason.MAX_TURNS
    session = await store.get_session(summary.sessions[0].session_id)
    omitted = [(m.turn, m.history_omitted) for m in session.messages if m.role == "user" and m.history_omitted]
    assert omitted and omitted[0][1] >= 1
    trimmed = next(r["messages"] for r in fake_llm.requests if "earlier messages are left out" in str(r["messages"]))
    first_user = next(m.content for m in session.messages if m.role == "user")
    assert [m["role"] for m in trimmed[:4]] == ["system", "user", "assistant", "user"]
    assert trimmed[1]["content"] == KICKOFF and trimmed[2]["content"] == first_user
    assert f"{omitted[0][1]} earlier messages are left out" in trimmed[3]["content"]
    assert trimmed[-1]["content"].startswith("You said:")  # the agent's latest reply is kept
    assert sum(len(m["content"]) for m in trimmed[1:]) <= limit
    # one failed call when it first overflowed; later turns are shortened up front
    assert fake_llm.calls == 6 + 1 and summary.usage["simulated_user"].failures == {"context_length": 1}
    exported = [json.loads(line) for line in await store.export_jsonl(summary.run_id)][0]["messages"]
    assert any(m.get("history_omitted") for m in exported)  # the trim is visible in the export too
    assert [t for t, _ in omitted] == [4, 5, 6]


async def test_a_conversation_that_does_not_fit_even_shortened_is_a_simulator_error(store, fake_llm):
    fake_llm.queue(turn(message="one"), turn(message="two"))
    fake_llm.set_handler(lambda req: FakeReply.context_length_exceeded())
    summary = await run(store, fake_llm, [{"goal": "g"}])
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.SIMULATOR_ERROR and s.turns == 2
    assert "even with 1 earlier messages left out" in s.stop_detail and "maximum context length" in s.stop_detail
    assert fake_llm.calls == 4  # two turns, then the call and the shortened call: never retried as transient
    u = summary.usage["simulated_user"]
    assert (u.calls, u.failed_calls, u.failures) == (4, 2, {"context_length": 2})


async def test_a_first_prompt_too_long_for_the_model_is_a_simulator_error(store, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply.context_length_exceeded())
    summary = await run(store, fake_llm, [{"goal": "g"}])
    assert summary.sessions[0].stop_reason == StopReason.SIMULATOR_ERROR
    assert "no earlier conversation to leave out" in summary.sessions[0].stop_detail
    assert fake_llm.calls == 1
