import json

import pytest
import torch

from palmchat.data.chat import (
    Ranking,
    encode_response,
    encode_sft,
    group_by_ranking,
    load_conversations,
    load_prompts,
    load_rankings,
    pad_left,
    pad_right,
    ranking_batch,
    scoring_sequence,
    sft_batch,
)
from palmchat.losses import ranking_loss, sequence_logprobs
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import ASSISTANT_ID, BOS_ID, EOT_ID, PAD_ID, USER_ID
from palmchat.utils.jsonl import DataError
from palmchat.world.synthetic import World, write_bundle

SIZES = dict(pretrain=20, sft=40, rankings=30, pairs=30, prompts_train=20, prompts_heldout=25, moderation=5)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(World(0).pretraining_documents(300), vocab_size=400)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    return write_bundle(out, seed=0, sizes=SIZES)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "4 + 4 = 8."}]


# ============================================================================ readers: good files
def test_world_bundle_sft(bundle):
    convs = load_conversations(bundle["sft"])
    raw = [json.loads(line) for line in bundle["sft"].read_text().splitlines()]
    assert len(convs) == SIZES["sft"]
    assert convs == [r["messages"] for r in raw]  # "quality"/"task" keys ignored


def test_world_bundle_rankings_best_first(bundle):
    ranks = load_rankings(bundle["rankings"])
    raw = [json.loads(line) for line in bundle["rankings"].read_text().splitlines()]
    assert len(ranks) == SIZES["rankings"]
    for r, rec in zip(ranks, raw):
        assert isinstance(r, Ranking)
        # a prompt is one user message, or (multi-turn) the conversation so far, ending with a user turn
        expected = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
        assert r.prompt_messages == expected and r.prompt_messages[-1]["role"] == "user"
        assert r.responses == [rec["responses"][i] for i in rec["ranking"]]
        assert len(r.responses) == 4


def test_world_bundle_pairs(bundle):
    ranks = load_rankings(bundle["pairs"])
    raw = [json.loads(line) for line in bundle["pairs"].read_text().splitlines()]
    assert [r.responses for r in ranks] == [[rec["chosen"], rec["rejected"]] for rec in raw]


def test_world_bundle_prompts(bundle):
    heldout = load_prompts(bundle["prompts_heldout"])
    raw = [json.loads(line) for line in bundle["prompts_heldout"].read_text().splitlines()]
    assert heldout == [[{"role": "user", "content": rec["prompt"]}] for rec in raw]
    assert len(heldout) == SIZES["prompts_heldout"]
    train = load_prompts(bundle["prompts_train"])
    raw = [json.loads(line) for line in bundle["prompts_train"].read_text().splitlines()]
    assert train == [rec["messages"] for rec in raw] and len(train) == SIZES["prompts_train"]
    assert all(m[-1]["role"] == "user" for m in train)
    assert any(len(m) > 1 for m in train)  # some are conversations, for the RL stages


def test_other_good_forms_and_blank_lines(tmp_path):
    ctx = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    p = write_lines(tmp_path / "r.jsonl", [
        "",
        {"prompt": ctx, "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "extra": 1},
        "   ",
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ])
    r = load_rankings(p)
    assert r[0].prompt_messages == ctx and r[0].responses == ["c", "a", "b"]
    assert r[1].responses == ["good", "bad"]
    p = write_lines(tmp_path / "p.jsonl", [{"messages": ctx}, {"prompt": ctx}, {"prompt": "x"}])
    assert load_prompts(p) == [ctx, ctx, [{"role": "user", "content": "x"}]]
    p = write_lines(tmp_path / "c.jsonl", [{"messages": CONV}, {"prompt": "q", "completion": "a"}])
    assert load_conversations(p)[1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# ============================================================================ readers: malformed records
def good_sft():
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def good_rank():
    return {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [0, 1, 2, 3]}


BAD = [
    # (reader, bad record or raw line, expected problem text)
    (load_conversations, '{"messages": [}', "invalid JSON ("),
    (load_conversations, "[1, 2]", "expected a JSON object, got a list"),
    (load_conversations, {"text": "hi"}, 'missing "messages"'),
    (load_conversations, {"messages": "hi"}, "messages must be a list"),
    (load_conversations, {"messages": []}, "messages is empty"),
    (load_conversations, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role 'bot' is not one of system, user, assistant"),
    (load_conversations, {"messages": [{"content": "a"}]}, 'messages[0] has no "role"'),
    (load_conversations, {"messages": [{"role": "assistant"}]}, 'messages[0] has no "content"'),
    (load_conversations, {"messages": [{"role": "assistant", "content": None}]},
     "messages[0].content must be a string, got null"),
    (load_conversations, {"messages": ["hi"]}, "messages[0] must be an object"),
    (load_conversations, {"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    (load_rankings, '{"prompt": "q", "chosen": "a" "rejected": "b"}', "invalid JSON (Expecting ',' delimiter"),
    (load_rankings, {"responses": ["a", "b"], "ranking": [0, 1]}, 'missing "prompt"'),
    (load_rankings, {"prompt": 3, "chosen": "a", "rejected": "b"}, '"prompt" must be a string or a list'),
    (load_rankings, {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "chosen": "a", "rejected": "b"}, '"prompt" must end with a user message'),
    (load_rankings, {"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
    (load_rankings, {"prompt": "q", "chosen": 1, "rejected": "b"}, '"chosen" must be a string, got a number'),
    (load_rankings, {"prompt": "q"}, 'missing "responses" + "ranking"'),
    (load_rankings, {"prompt": "q", "responses": ["a", "b"]}, 'missing "ranking"'),
    (load_rankings, {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "chosen": "a"}, "not both"),
    (load_rankings, {**good_rank(), "ranking": [0, 0, 1, 2]},
     '"ranking" must be a permutation of 0..3, got [0, 0, 1, 2]'),
    (load_rankings, {**good_rank(), "ranking": [0, 1, 2]}, '"ranking" must be a permutation of 0..3, got [0, 1, 2]'),
    (load_rankings, {**good_rank(), "ranking": [0, 1, 2, 4]}, "must be a permutation of 0..3"),
    (load_rankings, {**good_rank(), "ranking": "0123"}, "must be a permutation of 0..3"),
    (load_rankings, {"prompt": "q", "responses": ["a"], "ranking": [0]},
     '"responses" must hold 2 to 9 responses, got 1'),
    (load_rankings, {"prompt": "q", "responses": ["a"] * 10, "ranking": list(range(10))}, "got 10"),
    (load_rankings, {"prompt": "q", "responses": "ab", "ranking": [0, 1]}, '"responses" must be a list'),
    (load_rankings, {"prompt": "q", "responses": ["a", None], "ranking": [0, 1]},
     "responses[1] must be a string, got null"),
    (load_prompts, {"text": "q"}, 'missing "prompt" (or "messages")'),
    (load_prompts, {"prompt": None}, '"prompt" must be a string or a list of messages, got null'),
    (load_prompts, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     '"messages" must end with a user message'),
    (load_prompts, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
]


@pytest.mark.parametrize("reader,bad,problem", BAD, ids=[f"{r.__name__}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_malformed_record_names_file_line_problem(tmp_path, reader, bad, problem):
    good = good_sft() if reader is load_conversations else good_rank() if reader is load_rankings else {"prompt": "q"}
    path = write_lines(tmp_path / "data.jsonl", [good, "", good, bad, good])  # the bad record is on line 4
    with pytest.raises(DataError) as e:
        reader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: "), msg
    assert problem in msg, msg
    assert "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    for reader in (load_conversations, load_rankings, load_prompts):
        with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
            reader(tmp_path / "nope.jsonl")
        empty = tmp_path / "empty.jsonl"
        empty.write_text("\n  \n")
        with pytest.raises(DataError, match=r"empty.jsonl: no records"):
            reader(empty)
    assert issubclass(DataError, ValueError)


def test_invalid_utf8(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(json.dumps(good_sft()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        load_conversations(p)


# ============================================================================ encode_sft
def test_encode_sft_targets_only_on_assistant_tokens(tok):
    full, mask = tok.chat_format.render(CONV)
    ids, targets = encode_sft(tok, CONV, max_len=512)
    assert ids == full[:-1] and len(targets) == len(ids)
    for t in range(len(ids)):
        if mask[t + 1]:
            assert targets[t] == full[t + 1]
        else:
            assert targets[t] == -100
    # explicitly: the supervised tokens are exactly each reply's content and its eot
    expect = []
    for m in CONV:
        body = tok.encode(m["content"]) + [EOT_ID]
        expect += body if m["role"] == "assistant" else []
    assert [t for t in targets if t != -100] == expect
    assert sum(t == EOT_ID for t in targets) == 2  # one eot per assistant turn, none for user/system
    assert encode_sft(tok, CONV, 512).truncated == 0


def test_encode_sft_truncation(tok):
    full, _ = tok.chat_format.render(CONV)
    ex = encode_sft(tok, CONV, max_len=10)
    assert len(ex.ids) == len(ex.targets) == 10
    assert ex.ids == full[:10] and ex.truncated == len(full) - 11
    assert all(t == -100 for t in ex.targets)  # the cut removed every reply: caller skips it
    b = sft_batch(tok, [CONV, CONV[:3]], max_len=512)
    assert b["ids"].shape == b["targets"].shape
    assert b["targets"][1, b["lengths"][1]:].eq(-100).all()


# ============================================================================ encode_response
def test_encode_response_layout(tok):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    ids, plen = encode_response(tok, prompt, "2 + 3 = 5.", max_len=512)
    assert ids == tok.chat_format.render_prompt(prompt) + tok.encode("2 + 3 = 5.") + [EOT_ID]
    assert plen == len(tok.chat_format.render_prompt(prompt)) and ids[plen - 1] == ASSISTANT_ID and ids[-1] == EOT_ID
    # token ids are accepted too; a trailing eot is not repeated
    assert encode_response(tok, prompt, tok.encode("2 + 3 = 5.") + [EOT_ID], 512)[0] == ids


def test_encode_response_truncates_prompt_from_left(tok):
    prompt = [{"role": "user", "content": "word " * 60}]
    resp = tok.encode("The answer is 5.")
    full = tok.chat_format.render_prompt(prompt)
    enc = encode_response(tok, prompt, "The answer is 5.", max_len=30)
    ids, plen = enc
    assert len(ids) == 30 and ids[0] == BOS_ID
    assert ids[plen:] == resp + [EOT_ID]  # the response and its eot are intact
    assert ids[1:plen] == full[len(full) - (plen - 1):]  # the prompt's newest tokens are kept
    assert enc.prompt_truncated == len(full) - plen and enc.response_truncated == 0
    # minimum prompt: bos + assistant token; then the response tail is cut, and its eot kept
    enc = encode_response(tok, prompt, "long answer " * 30, max_len=12)
    assert len(enc.ids) == 12 and enc.prompt_len == 2
    assert enc.ids[:2] == [BOS_ID, ASSISTANT_ID] and enc.ids[-1] == EOT_ID
    assert enc.ids[2:-1] == tok.encode("long answer " * 30)[:9] and enc.response_truncated > 0
    with pytest.raises(ValueError, match="max_len"):
        encode_response(tok, prompt, "x", max_len=2)


def test_scoring_sequence_cuts_the_oldest_prompt_tokens_and_keeps_bos():
    prompt = [BOS_ID, USER_ID, 10, 11, 12, 13, EOT_ID, ASSISTANT_ID]  # 8 tokens
    whole = scoring_sequence(prompt, [20, 21], max_len=11, eot_id=EOT_ID)
    assert whole.ids == prompt + [20, 21, EOT_ID] and whole.prompt_len == 8 and not whole.truncated
    # 11 tokens into 7: the reply [20, 21, eot] stays whole, the prompt loses its 4 oldest tokens after bos
    cut = scoring_sequence(prompt, [20, 21], max_len=7, eot_id=EOT_ID)
    assert cut.ids == [BOS_ID, 13, EOT_ID, ASSISTANT_ID, 20, 21, EOT_ID]
    assert cut.prompt_len == 4 and cut.prompt_truncated == 4 and cut.response_truncated == 0
    ended = scoring_sequence(prompt, [20, 21, EOT_ID], max_len=7, eot_id=EOT_ID)
    assert ended.ids == cut.ids  # an ended reply: same sequence
    # a reply that alone does not fit in max_len - 2: bos + assistant token, the reply's head, eot
    long = scoring_sequence(prompt, list(range(20, 30)), max_len=7, eot_id=EOT_ID)
    assert long.ids == [BOS_ID, ASSISTANT_ID, 20, 21, 22, 23, EOT_ID]
    assert long.prompt_truncated == 6 and long.response_truncated == 6


# ============================================================================ padding
def test_pad_right_and_left():
    seqs = [[7, 8, 9], [4], [1, 2, 3, 4, 5]]
    ids, lengths = pad_right(seqs, PAD_ID)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert lengths.tolist() == [3, 1, 5]
    assert ids.tolist() == [[7, 8, 9, 0, 0], [4, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    ids, mask = pad_left(seqs, PAD_ID)
    assert ids.tolist() == [[0, 0, 7, 8, 9], [0, 0, 0, 0, 4], [1, 2, 3, 4, 5]]
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 1, 5]
    assert mask.tolist()[0] == [False, False, True, True, True]
    targets, _ = pad_right([[1, -100], [2]], -100)
    assert targets.tolist() == [[1, -100], [2, -100]]
    with pytest.raises(ValueError):
        pad_right([], 0)


# ============================================================================ ranking batch
def test_ranking_batch_flattens_best_first(tok):
    rankings = [Ranking([{"role": "user", "content": "What is 2 + 3?"}], ["2 + 3 = 5.", "It is 6.", "Ugh. 5."]),
                Ranking([{"role": "user", "content": "Sort 3, 1."}], ["The sorted list is 1, 3.", "No."])]
    b = ranking_batch(tok, rankings, max_len=64)
    N = 5
    assert b["ids"].shape[0] == N and b["ids"].shape[1] == int(b["lengths"].max())
    assert b["group"].tolist() == [0, 0, 0, 1, 1] and b["rank"].tolist() == [0, 1, 2, 0, 1]
    assert b["num_responses"].tolist() == [3, 2]
    assert torch.equal(b["eot_index"], b["lengths"] - 1)
    assert (b["ids"][torch.arange(N), b["eot_index"]] == EOT_ID).all()
    assert (b["ids"][torch.arange(N), b["prompt_lens"] - 1] == ASSISTANT_ID).all()
    for i, (g, r) in enumerate(zip(b["group"].tolist(), b["rank"].tolist())):
        L = int(b["lengths"][i])
        expect = encode_response(tok, rankings[g].prompt_messages, rankings[g].responses[r], 64)[0]
        assert b["ids"][i, :L].tolist() == expect and (b["ids"][i, L:] == PAD_ID).all()
    # back to the (B, K_max) layout of ranking_loss; padded column filled
    values = torch.arange(5.0, requires_grad=True)
    grid = group_by_ranking(values, b["num_responses"], fill=float("nan"))
    assert grid[0].tolist() == [0.0, 1.0, 2.0] and grid[1, :2].tolist() == [3.0, 4.0] and grid[1, 2].isnan()
    loss, _ = ranking_loss(grid, b["num_responses"])
    loss.backward()
    assert torch.isfinite(values.grad).all()


def test_ranking_batch_with_model_end_to_end(tok):
    config = preset("tiny", vocab_size=tok.vocab_size)
    model = Transformer(config).eval()
    rankings = [Ranking([{"role": "user", "content": "What is 2 + 3?"}], ["2 + 3 = 5.", "It is 6."])]
    b = ranking_batch(tok, rankings, max_len=64)
    with torch.no_grad():
        lp = sequence_logprobs(model(b["ids"]), b["ids"], b["prompt_lens"], b["lengths"])
        for i in range(2):
            L = int(b["lengths"][i])
            alone = model(b["ids"][i:i + 1, :L])
            ref = sequence_logprobs(alone, b["ids"][i:i + 1, :L], b["prompt_lens"][i:i + 1], b["lengths"][i:i + 1])
            assert lp[i].item() == pytest.approx(ref.item(), abs=1e-4)


# ============================================================================ one truncation policy
def test_a_ranking_prompt_is_truncated_once_for_all_its_responses(tok):
    """Chosen and rejected must be compared on the same context: a long prompt is cut once per ranking, leaving
    room for its longest response, and every response sees the same prompt tokens (bos first)."""
    prompt = [{"role": "user", "content": "word " * 40}]
    ranking = Ranking(prompt, ["The answer is 5.", "No.", "It is five, because two and three make five."])
    b = ranking_batch(tok, [ranking], max_len=40)
    heads = {tuple(b["ids"][i, :int(b["prompt_lens"][i])].tolist()) for i in range(3)}
    assert len(heads) == 1 and b["prompt_lens"].unique().numel() == 1
    head = heads.pop()
    assert head[0] == BOS_ID and head[-1] == ASSISTANT_ID
    full = tok.chat_format.render_prompt(prompt)
    assert list(head[1:]) == full[len(full) - (len(head) - 1):]  # the newest prompt tokens
    longest = len(tok.encode(ranking.responses[2])) + 1
    assert len(head) == 40 - longest and int(b["lengths"].max()) == 40
    for i, text in enumerate(ranking.responses):  # every response whole
        assert b["ids"][i, len(head):int(b["lengths"][i])].tolist() == tok.encode(text) + [EOT_ID]


def test_max_prompt_len_caps_the_prompt_and_a_response_that_cannot_fit_is_an_error(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 30}]
    ranking = Ranking(prompt, ["The answer is 5.", "No."])
    b = ranking_batch(tok, [ranking], max_len=64, max_prompt_len=10)
    assert b["prompt_lens"].tolist() == [10, 10] and (b["ids"][:, 0] == BOS_ID).all()
    assert (b["ids"][:, 9] == ASSISTANT_ID).all()
    assert bool(b["truncated"].all())
    # the prompt limit leaves 64 - 10 = 54 tokens: a long response loses its tail, keeps its eot
    long = Ranking(prompt, ["long answer " * 40, "No."])
    b = ranking_batch(tok, [long], max_len=64, max_prompt_len=10)
    assert int(b["lengths"][0]) == 64 and b["ids"][0, 63].item() == EOT_ID
    # the prompt never takes more than leaves its longest response whole, down to bos + assistant token: only
    # a limit with no room for one response token is an error, never a silently empty response
    room = 12 - len(tok.encode("The answer is 5.")) - 1
    assert ranking_batch(tok, [ranking], max_len=12, max_prompt_len=11)["prompt_lens"].tolist() == [room, room]
    with pytest.raises(ValueError, match="nothing of a .*response fits"):
        ranking_batch(tok, [ranking], max_len=3)
    assert scoring_sequence([BOS_ID, ASSISTANT_ID], [], 3, EOT_ID).ids == [BOS_ID, ASSISTANT_ID, EOT_ID]
    with pytest.raises(ValueError, match="max_prompt_len must be >= 2"):
        ranking_batch(tok, [ranking], max_len=64, max_prompt_len=1)
    # scoring one (prompt, response) is the one-response case of the same policy
    one = scoring_sequence([BOS_ID, USER_ID, 10, 11, 12, EOT_ID, ASSISTANT_ID], [20, 21], 64, EOT_ID,
                           max_prompt_len=4)
    assert one.ids == [BOS_ID, 12, EOT_ID, ASSISTANT_ID, 20, 21, EOT_ID] and one.prompt_truncated == 3
