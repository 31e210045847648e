import json

import pytest
import torch

from palmchat import checkpoint
from palmchat.checkpoint.heads import (
    HEAD_FILE,
    load_reward_model,
    load_value_model,
    save_reward_model,
    save_value_model,
)
from palmchat.data.chat import pad_left, pad_right
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel, ValueModel, end_of_turn_index
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.chat_format import ASSISTANT_ID, BOS_ID, EOT_ID, USER_ID

ATOL = 1e-5


def conversation(prompt_len, response_len, seed):
    """[bos, user, prompt..., eot, assistant, response..., eot] with ordinary ids in [6, 97)."""
    g = torch.Generator().manual_seed(seed)
    body = lambda n: torch.randint(6, 97, (n,), generator=g).tolist()  # noqa: E731
    return [BOS_ID, USER_ID] + body(prompt_len) + [EOT_ID, ASSISTANT_ID] + body(response_len) + [EOT_ID]


@pytest.fixture(params=["parallel", "sequential"])
def reward_model(request):
    config = preset("tiny", vocab_size=97, block=request.param)
    return RewardModel(Transformer(config), EOT_ID).eval()


@pytest.fixture
def batch():
    target = conversation(5, 4, seed=0)
    longer = conversation(9, 11, seed=1)
    shorter = conversation(2, 1, seed=2)
    return target, [longer, target, shorter]


# ============================================================================ the padding traps
def test_same_reward_alone_right_padded_left_padded(reward_model, batch):
    target, seqs = batch
    with torch.no_grad():
        alone = reward_model(torch.tensor([target]), torch.tensor([len(target) - 1]))

        ids, lengths = pad_right(seqs, 0)
        right = reward_model(ids, lengths - 1)
        right_found = reward_model(ids, end_of_turn_index(ids, EOT_ID))  # eot lookup agrees with lengths - 1
        right_masked = reward_model(ids, lengths - 1, padding_mask=torch.arange(ids.shape[1]) < lengths[:, None])

        ids_l, mask = pad_left(seqs, 0)
        eot_l = end_of_turn_index(ids_l, EOT_ID, mask)
        assert (eot_l == ids_l.shape[1] - 1).all()
        left = reward_model(ids_l, eot_l, padding_mask=mask)

    assert alone.shape == (1,) and right.shape == (3,) and right.dtype == torch.float32
    for r in (right, right_found, right_masked, left):
        torch.testing.assert_close(r[1:2], alone, atol=ATOL, rtol=0)
    # every row agrees between the two paddings, not only the target
    torch.testing.assert_close(right, left, atol=ATOL, rtol=0)
    # and the test has teeth: reading at the last POSITION of a right-padded row (a pad) is wrong
    with torch.no_grad():
        at_pad = reward_model.head(reward_model.backbone.hidden_states(ids)[1, -1]).squeeze(-1)
    assert (at_pad - alone[0]).abs() > 1e-3


def test_tokens_after_eot_do_not_matter_response_tokens_do(reward_model, batch):
    _, seqs = batch
    ids, lengths = pad_right(seqs, 0)
    eot = lengths - 1
    with torch.no_grad():
        base = reward_model(ids, eot)
        garbage = ids.clone()
        garbage[1, lengths[1]:] = torch.arange(50, 50 + ids.shape[1] - int(lengths[1]))  # junk in the padding
        garbage[2, lengths[2]:] = EOT_ID  # even eot ids in the padding are ignored at an explicit index
        torch.testing.assert_close(reward_model(garbage, eot), base, atol=ATOL, rtol=0)

        changed = ids.clone()
        changed[1, eot[1] - 1] = 7 if int(ids[1, eot[1] - 1]) != 7 else 8  # last response token
        out = reward_model(changed, eot)
        assert (out[1] - base[1]).abs() > 1e-4
        torch.testing.assert_close(out[[0, 2]], base[[0, 2]], atol=ATOL, rtol=0)  # rows are independent

        # left padding: junk in the pads (masked) changes nothing either
        ids_l, mask = pad_left(seqs, 0)
        eot_l = end_of_turn_index(ids_l, EOT_ID, mask)
        base_l = reward_model(ids_l, eot_l, padding_mask=mask)
        junk = ids_l.clone()
        junk[~mask] = 42
        torch.testing.assert_close(reward_model(junk, eot_l, padding_mask=mask), base_l, atol=ATOL, rtol=0)


# ============================================================================ end_of_turn_index
def test_end_of_turn_index_last_eot_among_real_tokens():
    ids = torch.tensor([[1, 3, 9, 5, 4, 8, 5, 0, 0],
                        [1, 3, 9, 5, 4, 8, 8, 8, 5]])
    assert end_of_turn_index(ids, EOT_ID).tolist() == [6, 8]
    # with a mask, an eot id sitting in the padding is not real
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = False
    assert end_of_turn_index(ids, EOT_ID, mask).tolist() == [3, 8]
    assert RewardModel.end_of_turn_index(ids, EOT_ID).tolist() == [6, 8]


def test_end_of_turn_index_errors_name_the_row():
    ids = torch.tensor([[1, 3, 9, 5, 4, 8, 5], [1, 3, 9, 5, 4, 8, 8], [1, 3, 9, 9, 4, 8, 8]])
    with pytest.raises(ValueError, match=r"row 2 has no end-of-turn token \(id 5\)"):
        end_of_turn_index(ids, EOT_ID)
    # a response that never ended must not be scored at the prompt's eot: pass the response start
    with pytest.raises(ValueError, match=r"row 1 has no end-of-turn token .* at or after index 5"):
        end_of_turn_index(ids[:2], EOT_ID, start=torch.tensor([5, 5]))
    mask = torch.ones_like(ids[:1], dtype=torch.bool)
    mask[0, 3:] = False
    with pytest.raises(ValueError, match="row 0"):
        end_of_turn_index(ids[:1], EOT_ID, mask)


def test_forward_refuses_an_index_that_is_not_an_eot(tiny_config):
    model = RewardModel(Transformer(tiny_config), EOT_ID).eval()
    ids, lengths = pad_right([conversation(3, 3, 0), conversation(3, 1, 1)], 0)
    with pytest.raises(ValueError, match=r"eot_index\[1\]"):
        model(ids, torch.full((2,), ids.shape[1] - 1))  # the last position of row 1 is a pad


# ============================================================================ value model
def test_value_model_per_token_and_padding(tiny_config, batch):
    _, seqs = batch
    model = ValueModel(Transformer(tiny_config)).eval()
    with torch.no_grad():
        ids, lengths = pad_right(seqs, 0)
        values = model(ids)
        ids_l, mask = pad_left(seqs, 0)
        values_l = model(ids_l, padding_mask=mask)
        alone = model(torch.tensor([seqs[1]]))
    assert values.shape == ids.shape and values.dtype == torch.float32
    L = len(seqs[1])
    torch.testing.assert_close(values[1, :L], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(values_l[1, -L:], alone[0], atol=ATOL, rtol=0)


# ============================================================================ checkpoints
def test_reward_model_save_load_round_trip(tmp_path, tiny_config, batch):
    _, seqs = batch
    model = RewardModel(Transformer(tiny_config), EOT_ID).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    ids, lengths = pad_right(seqs, 0)
    with torch.no_grad():
        before = model(ids, lengths - 1)
    final = save_reward_model(model, tmp_path / "rm", 7, {"stage": "reward"})
    assert (final / HEAD_FILE).is_file() and (final / checkpoint.MODEL_FILE).is_file()
    assert not any(p.name.startswith(".") for p in (tmp_path / "rm").iterdir() if p.is_dir())  # no temp left

    loaded, config = load_reward_model(tmp_path / "rm")  # a run folder resolves through `latest`
    assert config["stage"] == "reward" and config["head"] == "reward" and config["step"] == 7
    assert config["readout"] == "eot"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, lengths - 1), before)
    # a checkpoint written before reward models had readouts is an end-of-turn one
    config_path = final / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "readout"}))
    older, _ = load_reward_model(final)
    with torch.no_grad():
        assert older.readout == "eot" and torch.equal(older.eval()(ids, lengths - 1), before)

    # model.safetensors is a plain PaLM checkpoint: same names, loads as a language model
    lm, _, _ = checkpoint.load_model(final)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(lm.state_dict()[name], tensor)

    # the critic can start from the reward model
    value, _ = load_value_model(final)
    with torch.no_grad():
        torch.testing.assert_close(value.eval()(ids)[torch.arange(3), lengths - 1], before, atol=ATOL, rtol=0)


def test_load_errors(tmp_path, tiny_config):
    lm = Transformer(tiny_config)
    plain = checkpoint.save_checkpoint(tmp_path / "lm", 1, lm, {"model": tiny_config.to_dict()})
    with pytest.raises(checkpoint.CheckpointError, match=r"is not a reward model checkpoint \(no head.safetensors\)"):
        load_reward_model(plain)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        load_reward_model(tmp_path / "missing")
    value_ckpt = save_value_model(ValueModel(lm), tmp_path / "vm", 1, {})
    with pytest.raises(checkpoint.CheckpointError, match="value model checkpoint, not a reward model"):
        load_reward_model(value_ckpt)
    assert isinstance(load_value_model(value_ckpt)[0], ValueModel)
    (value_ckpt / HEAD_FILE).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        load_value_model(value_ckpt)


def test_value_from_reward_model(tiny_config):
    rm = RewardModel(Transformer(tiny_config), EOT_ID).eval()
    vm = ValueModel.from_reward_model(rm).eval()
    ids = torch.tensor([conversation(3, 3, 0)])
    with torch.no_grad():
        torch.testing.assert_close(vm(ids)[:, -1], rm(ids, torch.tensor([ids.shape[1] - 1])))
    assert vm.head.weight.data_ptr() != rm.head.weight.data_ptr()  # a copy, not shared


# ============================================================================ the eot+gap readout
def gap_model(block="parallel"):
    model = RewardModel(Transformer(preset("tiny", vocab_size=97, block=block)), EOT_ID, readout="eot+gap").eval()
    with torch.no_grad():
        model.gap_weight.fill_(0.5)
    return model


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_gap_readout_adds_the_replys_mean_logit_gap_by_hand(block):
    model = gap_model(block)
    seq = conversation(5, 4, seed=0)
    start = 2 + 5 + 2  # bos, user, 5 prompt tokens, eot, assistant: the reply begins here
    ids = torch.tensor([seq])
    with torch.no_grad():
        got = model(ids, torch.tensor([len(seq) - 1]), response_start=torch.tensor([start]))
        hidden = model.backbone.hidden_states(ids)
        logits = model.backbone.logits(hidden)[0]
        gaps = [logits[t - 1, seq[t]] - logits[t - 1].max() for t in range(start, len(seq))]  # the eot included
        want = model.head(hidden[0, -1]) + 0.5 * torch.stack(gaps).mean()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert all(g <= 0 for g in gaps) and min(gaps) < -1e-3  # random replies are not what the model would write


def test_gap_is_zero_for_the_reply_the_model_would_write_itself():
    from palmchat.model.heads import response_logit_gaps

    model = gap_model()
    seq = conversation(5, 0, seed=0)[:-1]  # the prompt, up to the assistant token
    with torch.no_grad():
        for _ in range(6):  # greedy decoding
            seq.append(int(model.backbone(torch.tensor([seq]))[0, -1].argmax()))
        ids = torch.tensor([seq])
        hidden = model.backbone.hidden_states(ids)
        greedy = response_logit_gaps(model.backbone, hidden, ids, torch.tensor([len(seq) - 6]),
                                     torch.tensor([len(seq) - 1]))
        ids[0, -3] = (seq[-3] + 1) % 97  # one token that is not the model's choice
        other = response_logit_gaps(model.backbone, model.backbone.hidden_states(ids), ids,
                                    torch.tensor([len(seq) - 6]), torch.tensor([len(seq) - 1]))
    assert greedy.item() == 0.0 and other.item() < 0


def test_gap_readout_same_alone_right_padded_left_padded(batch):
    model = gap_model()
    target, seqs = batch
    starts = torch.tensor([len(s) - s[::-1].index(ASSISTANT_ID) for s in seqs])  # after the last assistant token
    with torch.no_grad():
        alone = model(torch.tensor([target]), torch.tensor([len(target) - 1]), response_start=starts[1:2])
        ids, lengths = pad_right(seqs, 0)
        right = model(ids, lengths - 1, response_start=starts)
        ids_l, mask = pad_left(seqs, 0)
        shift = ids_l.shape[1] - lengths
        left = model(ids_l, torch.full_like(lengths, ids_l.shape[1] - 1), padding_mask=mask,
                     response_start=starts + shift)
        scored = model.score(ids_l, padding_mask=mask, start=starts + shift)
        with pytest.raises(ValueError, match="response_start"):
            model(ids, lengths - 1)
    torch.testing.assert_close(right[1:2], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)
    torch.testing.assert_close(scored, right, atol=ATOL, rtol=0)


def test_gap_readout_save_load_round_trip_and_a_head_without_its_weight(tmp_path, batch):
    from safetensors.torch import load_file, save_file

    model = gap_model()
    _, seqs = batch
    ids, lengths = pad_right(seqs, 0)
    starts = torch.tensor([len(s) - s[::-1].index(ASSISTANT_ID) for s in seqs])
    with torch.no_grad():
        before = model(ids, lengths - 1, response_start=starts)
    final = save_reward_model(model, tmp_path / "rm", 1, {})
    loaded, config = load_reward_model(final)
    assert config["readout"] == "eot+gap" and loaded.gap_weight.item() == 0.5
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, lengths - 1, response_start=starts), before)
    head = load_file(final / HEAD_FILE)
    save_file({k: v for k, v in head.items() if k != "gap_weight"}, final / HEAD_FILE)
    with pytest.raises(checkpoint.CheckpointError, match=r"head.safetensors: head tensors .* do not match"):
        load_reward_model(final)
    with pytest.raises(ValueError, match="unknown reward readout 'mean'"):
        RewardModel(Transformer(preset("tiny", vocab_size=97)), EOT_ID, readout="mean")
