"""Tool use in the bundled world: its calculator and directory, tool-use conversations (their rendering, loss mask,
determinism and place in the bundle), and the tool-use evaluation, scored on hand-written transcripts and run on a
tiny model trained on the conversations."""

import json
import re

import pytest

from palmchat.data.chat import encode_sft, load_conversations
from palmchat.data.formats import ToolConversation, parse_sft_record, read_examples
from palmchat.eval.tool_use import evaluate_tool_use, score_tool_use, tool_prompt
from palmchat.losses import IGNORE_INDEX
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.utils.jsonl import RecordError
from palmchat.world.synthetic import World, write_bundle
from palmchat.world.tools import NO_SUCH_PERSON, WORLD_TOOLS, calculate, is_right_call


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(world.pretraining_documents(300), vocab_size=320)


def call(name, arguments, call_id="c1"):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


# ------------------------------------------------------------------------------------------- the tools
def test_calculator_reads_the_worlds_arithmetic_and_nothing_else(world):
    assert world.run_tool("calculator", {"expression": "23 + 58"}) == "81"
    assert world.run_tool("calculator", '{"expression": "7 * 8"}') == "56"  # the JSON text a model writes
    assert world.run_tool("calculator", {"expression": "12 - 30"}) == "-18"
    assert calculate("2 + 3 * 4") == 14 and calculate("(2 + 3) * 4") == 20 and calculate("-(4 - 10)") == 6
    assert calculate("6 \u00d7 7") == 42
    for bad in ("__import__('os')", "2 ** 3", "1 / 2", "2 +", "(1 + 2", "1 2", "", "x" * 300):
        result = world.run_tool("calculator", {"expression": bad})
        assert result.startswith("error: "), bad
    for arguments in ({}, {"expr": "1 + 1"}, {"expression": 3}, {"expression": "1 + 1", "x": 1}, "not json", "[1]"):
        assert world.run_tool("calculator", arguments).startswith("error: "), arguments


def test_lookup_person_gives_the_directory_entry(world):
    person = world.entities[0]
    entry = world.run_tool("lookup_person", {"name": person.name})
    for fact in (person.name, person.kind, f"{person.age} years old", person.town, person.food, person.color,
                 person.pet):
        assert fact in entry
    assert world.run_tool("lookup_person", {"name": person.name.lower()}) == entry
    assert world.run_tool("lookup_person", {"name": "Nobodyatall"}) == NO_SUCH_PERSON
    assert world.run_tool("lookup_person", {"name": world.towns[0].name}) == NO_SUCH_PERSON  # a town is no person
    assert world.run_tool("lookup_person", {"person": person.name}).startswith("error: ")
    assert world.run_tool("weather", {"city": "Paris"}).startswith("error: there is no tool 'weather'")


# ------------------------------------------------------------------------------------------- conversations
def test_tool_conversations_call_the_right_tool_and_answer_well(world):
    records = world.tool_conversations(80)
    assert {r["task"] for r in records} == {"arithmetic", "fact"}
    for r in records:
        question, assistant, tool, answer = r["messages"]
        assert r["tools"] == WORLD_TOOLS and question["role"] == "user" and tool["role"] == "tool"
        assert world.split_of(question["content"]) == "train"
        function = assistant["tool_calls"][0]["function"]
        assert isinstance(function["arguments"], str)  # OpenAI's wire form: the arguments' JSON text
        assert is_right_call(world.parse(question["content"]), function["name"], function["arguments"])
        assert tool["content"] == world.run_tool(function["name"], function["arguments"])
        assert tool["tool_call_id"] == assistant["tool_calls"][0]["id"]
        assert world.verify(question["content"], answer["content"]).score == 1.0
    heldout = world.tool_questions(60, "heldout")
    assert all(world.split_of(q) == "heldout" for q in heldout) and len(set(heldout)) == len(heldout)


def test_tool_conversations_are_deterministic_and_prefix_stable(world):
    assert World(seed=0).tool_conversations(40) == world.tool_conversations(40)
    assert world.tool_conversations(70)[:40] == world.tool_conversations(40)
    assert world.tool_questions(30, "heldout") == World(seed=0).tool_questions(50, "heldout")[:30]
    assert World(seed=1).tool_conversations(20) != world.tool_conversations(20)


def test_loss_mask_covers_the_call_and_the_answer_not_the_tool_result(world, tokenizer, tmp_path):
    paths = write_bundle(tmp_path, seed=0, sizes=dict(pretrain=5, sft=5, rankings=5, pairs=5, prompts_train=5,
                                                      prompts_heldout=5, moderation=5, tool_sft=12,
                                                      prompts_tools_heldout=4))
    conversations = load_conversations(paths["tool_sft"])  # the SFT reader keeps the tools and the calls
    assert len(conversations) == 12 and all(isinstance(c, ToolConversation) for c in conversations)
    record = json.loads(paths["tool_sft"].read_text().splitlines()[0])
    ids, targets = encode_sft(tokenizer, conversations[0], max_len=2048)
    trained = tokenizer.decode([t for t in targets if t != IGNORE_INDEX])
    context = tokenizer.decode([i for i, t in zip(ids, targets) if t == IGNORE_INDEX])
    function = record["messages"][1]["tool_calls"][0]["function"]
    rendered_call = json.dumps({"name": function["name"], "arguments": json.loads(function["arguments"])})
    assert f"<tool_call>{rendered_call}</tool_call>" in trained
    assert record["messages"][3]["content"] in trained
    result = record["messages"][2]["content"]
    assert result not in trained and f"<tool_response>{result}</tool_response>" in context
    assert '"name": "calculator"' in context and '"name": "lookup_person"' in context  # the tools offered
    assert record["messages"][0]["content"] in context and record["messages"][0]["content"] not in trained


def test_malformed_tool_records_are_named(world):
    record = world.tool_conversations(1)[0]
    assert parse_sft_record(record).tools == WORLD_TOOLS
    bad = [({**record, "tools": {"type": "function"}}, "tools must be a list"),
           ({**record, "messages": []}, "non-empty list"),
           ({**record, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be an object whose role"),
           ({**record, "messages": [record["messages"][0], {"role": "assistant", "content": None}]},
            "messages[1].content must be a string"),
           ({**record, "messages": [record["messages"][0], {"role": "assistant", "content": None,
                                                            "tool_calls": [{"function": {"name": "calculator"}}]}]},
            "messages[1].tool_calls[0] must be"),
           ({**record, "messages": record["messages"][:1]}, "no assistant message")]
    for broken, problem in bad:
        with pytest.raises(RecordError, match=re.escape(problem)):
            parse_sft_record(broken)
    without_tools = {k: v for k, v in record.items() if k != "tools"}  # tool messages are for records with tools
    with pytest.raises(RecordError):
        parse_sft_record(without_tools)


def test_the_evaluation_asks_as_the_training_data_renders(world, tokenizer):
    """The prompts the evaluation builds from a transcript (OpenAI messages, arguments as JSON text) are the SFT
    rendering of the same conversation up to the reply asked for."""
    for record in world.tool_conversations(4):
        full, _ = tokenizer.chat_format.render(parse_sft_record(record), tools=record["tools"])
        question, *transcript = record["messages"]
        for upto in (0, 2):  # before the call; after the tool's result
            prompt = tool_prompt(tokenizer.chat_format, question["content"], transcript[:upto])
            assert full[:len(prompt)] == prompt


def test_the_tool_files_are_streams_of_their_own(tmp_path):
    """However many tool conversations and questions are written, every other file of the bundle is the same, and a
    tool SFT file reads as conversations (stages and `palmchat data inspect` alike)."""
    sizes = dict(pretrain=40, sft=40, rankings=20, pairs=20, prompts_train=20, prompts_heldout=20, moderation=20)
    few = write_bundle(tmp_path / "few", seed=0, sizes={**sizes, "tool_sft": 3, "prompts_tools_heldout": 2})
    many = write_bundle(tmp_path / "many", seed=0, sizes={**sizes, "tool_sft": 20, "prompts_tools_heldout": 10})
    for name in sizes:
        assert few[name].read_bytes() == many[name].read_bytes(), name
    assert len(many["tool_sft"].read_text().splitlines()) == 20
    assert [json.loads(line) for line in many["prompts_tools_heldout"].read_text().splitlines()] == [
        {"prompt": q} for q in World(seed=0).tool_questions(10, "heldout")]
    examples = read_examples(many["tool_sft"], strict=False)
    assert len(examples.conversations) == 20 and not examples.bad
    assert all(isinstance(c, ToolConversation) for c in examples.conversations)


# ------------------------------------------------------------------------------------------- scoring
def test_scoring_of_handwritten_transcripts(world):
    add = next(q for q in world.tool_questions(60, "heldout") if world.parse(q).subtask == "add")
    a, b = world.parse(add).data["a"], world.parse(add).data["b"]
    fact = next(q for q in world.tool_questions(60, "heldout") if world.parse(q).family == "fact")
    name, good = world.parse(fact).data["name"], world.reference(fact)
    result = {"role": "tool", "tool_call_id": "c1", "content": "..."}

    def score(question, *messages):
        return score_tool_use(world, question, list(messages))

    right = score(add, call("calculator", {"expression": f"{b} + {a}"}), result,
                  {"role": "assistant", "content": world.reference(add)})
    assert right == {"called": True, "right_call": True, "right_answer": True, "both": True}
    assert score(fact, call("lookup_person", {"name": name}), result, {"role": "assistant", "content": good})["both"]
    wrong_numbers = score(add, call("calculator", {"expression": f"{a} + {b + 1}"}), result,
                          {"role": "assistant", "content": world.reference(add)})
    assert wrong_numbers == {"called": True, "right_call": False, "right_answer": True, "both": False}
    assert not score(add, call("calculator", {"expression": f"{a} - {b}"}))["right_call"]  # another operation
    assert not score(fact, call("calculator", {"expression": "1 + 1"}))["right_call"]  # the wrong tool
    no_answer = score(fact, call("lookup_person", {"name": name}))  # the call, then nothing
    assert no_answer == {"called": True, "right_call": True, "right_answer": False, "both": False}
    direct = score(add, {"role": "assistant", "content": world.reference(add)})  # no tool, the right answer
    assert direct == {"called": False, "right_call": False, "right_answer": True, "both": False}
    assert score(add, {"role": "assistant", "content": "I don't know."}) == {
        "called": False, "right_call": False, "right_answer": False, "both": False}
    # only the first call counts, and the answer is the last reply
    first_wrong = score(fact, call("lookup_person", {"name": "Nobody"}), result, call("lookup_person", {"name": name}),
                        result, {"role": "assistant", "content": good})
    assert first_wrong == {"called": True, "right_call": False, "right_answer": True, "both": False}


# ------------------------------------------------------------------------------------------- a tiny trained model
def test_a_tiny_model_learns_to_call_the_tools(tmp_path):
    """An untrained model makes no right call; a few dozen SFT steps on tool conversations alone teach a tiny one
    to write calls that parse; the evaluation's numbers stay consistent with each other."""
    from palmchat import checkpoint
    from palmchat.train.pretrain import PretrainArgs
    from palmchat.train.pretrain import main as pretrain
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft

    data = tmp_path / "data"
    paths = write_bundle(data, seed=0, sizes=dict(pretrain=300, sft=5, rankings=5, pairs=5, prompts_train=5,
                                                  prompts_heldout=5, moderation=5, tool_sft=160,
                                                  prompts_tools_heldout=16))
    pt = pretrain(PretrainArgs(out=str(tmp_path / "pt"), data=[str(paths["pretrain"])], preset="tiny", vocab_size=320,
                               model="max_seq_len=768", seq_len=128, batch_size=8, max_steps=10, eval_every=10,
                               save_every=10, dtype="fp32"))
    ckpt = sft(SFTArgs(base=str(pt), data=[str(paths["tool_sft"])], out=str(tmp_path / "sft"), epochs=5,
                       batch_size=8, lr=1e-2, dtype="fp32"))
    world = World(seed=0)
    questions = [json.loads(line)["prompt"] for line in paths["prompts_tools_heldout"].read_text().splitlines()]
    tokenizer = checkpoint.load_tokenizer(ckpt)
    results = {}
    for name, folder in (("untrained", pt), ("trained", ckpt)):
        model = checkpoint.load_model(folder)[0].eval()
        results[name] = evaluate_tool_use(model, tokenizer, world, questions, seed=0, temperature=0.0,
                                          n_examples=len(questions))
    for r in results.values():
        assert r["n"] == len(questions) == len(r["per_question"])
        assert r["both"] <= min(r["right_call"], r["right_answer"]) and r["right_call"] <= r["called"]
        families = [world.parse(q).family for q in questions]
        assert set(r["per_task"]) == {"arithmetic", "fact"}
        for family, means in r["per_task"].items():
            mine = [s for s, f in zip(r["per_question"], families) if f == family]
            assert means["called"] == sum(s["called"] for s in mine) / len(mine)
        for s, example in zip(r["per_question"], r["examples"]):
            assert s == score_tool_use(world, example["question"], example["transcript"])
    assert results["untrained"]["right_call"] == 0.0
    assert results["trained"]["called"] > 0.0, results["trained"]["examples"]
    # every call that parsed was run, and its result shown to the model before its next reply
    transcripts = [e["transcript"] for e in results["trained"]["examples"]]
    called = [t for t in transcripts if t[0].get("tool_calls")]
    assert called
    for t in called:
        function = t[0]["tool_calls"][0]["function"]
        assert t[1] == {"role": "tool", "tool_call_id": t[0]["tool_calls"][0]["id"],
                        "content": world.run_tool(function["name"], function["arguments"])}
        assert t[2]["role"] == "assistant"
