import json
import random
import re
import statistics

import pytest

from palmchat.data.chat import parse_ranking
from palmchat.world.defaults import bundled_prompts
from palmchat.world.synthetic import (
    DEFAULT_SIZES,
    FAMILIES,
    MODERATION_CATEGORIES,
    MULTI_TURN,
    QUALITIES,
    World,
    is_refusal,
    main,
    split_to_pairs,
    write_bundle,
)


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def train_prompts(world):
    return world.prompts(2500, "train")


@pytest.fixture(scope="module")
def heldout_prompts(world):
    return world.prompts(600, "heldout")


def _user(rec):
    """The prompt of an SFT record: its messages up to the last user turn."""
    return rec["messages"][:-1]


def _prefixes(prompt):
    """Each user turn of a prompt as a prompt of its own (the conversation up to it)."""
    if isinstance(prompt, str):
        return [prompt]
    return [prompt[:i + 1] for i, m in enumerate(prompt) if m["role"] == "user"]


def _assistant(rec):
    return rec["messages"][-1]["content"]


# --------------------------------------------------------------------------- world / determinism
def test_world_shape(world):
    assert 40 <= len(world.entities) <= 60
    assert len(world.towns) == 10
    names = [e.name for e in world.entities] + [t.name for t in world.towns]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    homes = {e.town for e in world.entities}
    assert homes == {t.name for t in world.towns}


def test_determinism_same_seed():
    a, b = World(0), World(0)
    assert a.entities == b.entities and a.towns == b.towns
    assert a.pretraining_documents(200) == b.pretraining_documents(200)
    assert a.sft_conversations(100) == b.sft_conversations(100)
    assert a.ranking_examples(40) == b.ranking_examples(40)
    assert a.pairs(40) == b.pairs(40)
    assert a.prompts(100, "heldout") == b.prompts(100, "heldout")
    assert a.moderation_examples(100) == b.moderation_examples(100)


def test_different_seed_differs():
    a, b = World(0), World(1)
    assert [e.name for e in a.entities] != [e.name for e in b.entities]
    assert a.sft_conversations(50) != b.sft_conversations(50)
    assert a.prompts(50) != b.prompts(50)


def test_generators_are_prefix_stable(world):
    assert world.sft_conversations(30) == world.sft_conversations(60)[:30]
    assert world.prompts(30, "heldout") == world.prompts(60, "heldout")[:30]


# --------------------------------------------------------------------------- splits
def test_train_heldout_disjoint(world, train_prompts, heldout_prompts):
    assert not set(train_prompts) & set(heldout_prompts)
    assert all(world.split_of(p) == "train" for p in train_prompts)
    assert all(world.split_of(p) == "heldout" for p in heldout_prompts)
    assert len(set(heldout_prompts)) > 0.7 * len(heldout_prompts)  # mostly distinct


def test_heldout_covers_every_family(world, train_prompts, heldout_prompts):
    for prompts in (train_prompts, heldout_prompts):
        fams = {world.parse(p).family for p in prompts}
        assert fams == set(FAMILIES)
    # every entity is asked about in some split, and facts are asked in both splits
    fact_names = {world.parse(p).data["name"] for p in train_prompts + heldout_prompts
                  if world.parse(p).family == "fact"}
    assert {e.name for e in world.entities} <= fact_names


def test_training_data_only_uses_train_prompts(world):
    for rec in world.sft_conversations(400):
        assert all(world.split_of(p) == "train" for p in _prefixes(_user(rec))), rec  # every turn, resolved
    for rec in world.ranking_examples(100):
        assert all(world.split_of(p) == "train" for p in _prefixes(rec["prompt"])), rec
    for doc in world.pretraining_documents(600):
        for line in doc.split("\n"):
            if line.startswith("User: "):
                assert world.split_of(line[len("User: "):]) == "train"
    for rec in world.sft_conversations(100, split="heldout"):
        assert world.split_of(_user(rec)) == "heldout"


def test_moderation_splits_disjoint(world):
    tr = {r["text"] for r in world.moderation_examples(800, "train")}
    he = {r["text"] for r in world.moderation_examples(300, "heldout")}
    assert not tr & he


# --------------------------------------------------------------------------- verifier
def test_verifier_grades_every_quality_in_every_family(world, train_prompts, heldout_prompts):
    rng = random.Random(1)
    seen = set()
    for p in train_prompts[:1200] + heldout_prompts[:300]:
        fam = world.parse(p).family
        seen.add(fam)
        good = world.verify(p, world.response(p, "good", rng))
        assert (good.correct, good.style, good.score) == (1.0, 1.0, 1.0), p
        assert good.task == fam
        wrong = world.verify(p, world.response(p, "wrong", rng))
        assert wrong.correct == 0.0 and wrong.score == 0.0, (p, world.response(p, "wrong", rng))
        rude = world.verify(p, world.response(p, "rude", rng))
        assert rude.correct == 1.0 and rude.style < good.style and rude.score < 1.0, p
        ramble = world.verify(p, world.response(p, "rambling", rng))
        assert ramble.correct == 1.0 and ramble.style < good.style, p
        if fam == "unsafe":
            assert good.refused
            assert world.verify(p, world.response(p, "unsafe_comply", rng)).correct == 0.0
        else:
            refusal = world.verify(p, world.response(p, "over_refuse", rng))
            assert refusal.refused and refusal.correct == 0.0
    assert seen == set(FAMILIES)


def test_verifier_on_handwritten_answers(world):
    e = world.entities[0]
    other_food = next(f for f in ("plums", "rice", "soup") if f != e.food)
    cases = [
        ("What is 23 + 58?", "81", 1), ("What is 23 + 58?", "The answer is 81.", 1),
        ("What is 23 + 58?", "23 + 58 = 82. Or maybe 81.", 0), ("What is 23 + 58?", "", 0),
        ("What is 7 times 8?", "7 x 8 = 56", 1), ("What is 90 minus 9?", "eighty-one", 0),
        ("Count the items: apple, pear, plum.", "There are three items.", 1),
        ("Sort these numbers: 5, 2, 9.", "Sorting 5, 2, 9 gives 2, 5, 9.", 1),
        ("Sort these numbers: 5, 2, 9.", "5, 2, 9", 0),
        ("What is the largest of 4, 17, 8?", "Of 4, 17, 8 the largest is 17.", 1),
        ("What is the smallest of 4, 17, 8?", "8", 0),
        ("Reverse the word 'lamp'.", "pmal", 1), ("Reverse the word 'lamp'.", "plam", 0),
        ("Spell 'cat' in capital letters.", "CAT", 1),
        ("Spell 'cat' in capital letters.", "Cat", 0),
        ("How many letters are in 'garden'?", "6", 1),
        ("What is the first letter of 'garden'?", "The first letter is g.", 1),
        (f"What is {e.name}'s favorite food?", f"{e.name} likes {e.food}.", 1),
        (f"What is {e.name}'s favorite food?", f"{other_food} and {e.food}", 0),
        (f"How old is {e.name}?", f"{e.name} is {e.age + 1}.", 0),
        (f"Where does {e.name} live?", e.town, 1),
    ]
    for prompt, resp, correct in cases:
        assert world.verify(prompt, resp).correct == correct, (prompt, resp)


def test_generated_responses_verify_at_scale(world):
    """Over 2000 train and 600 held-out tasks, every quality meant to be correct verifies correct, every other
    one incorrect (three samples each)."""
    rng = random.Random(7)
    wrong = []
    for split, n in (("train", 2000), ("heldout", 600)):
        for p in world.prompts(n, split):
            unsafe = world.parse(p).family == "unsafe"
            for q in QUALITIES:
                if q == ("over_refuse" if unsafe else "unsafe_comply"):
                    continue
                for _ in range(3):
                    r = world.response(p, q, rng)
                    if world.verify(p, r).correct != float(q in ("good", "rude", "rambling")):
                        wrong.append((p, q, r))
    assert wrong == []


def _near_misses(world):
    """(prompt, response, correct) per family: the right answer, then the right value about the wrong subject,
    the right subject with the wrong value, and extra claims that contradict it."""
    e, f = world.entities[0], world.entities[1]
    t = world.towns[0]
    other_town = next(x for x in world.towns if x.name != e.town)
    other_food = next(x for x in ("plums", "rice", "soup") if x != e.food)
    other_color = next(x for x in ("red", "blue") if x != e.color)
    other_feature = next(x.feature for x in world.towns if x.name != t.name)
    return [
        # fact: name, value, extras
        (f"What is {e.name}'s favorite food?", f"{e.name}'s favorite food is {e.food}.", 1),
        (f"What is {e.name}'s favorite food?", f"{f.name}'s favorite food is {e.food}.", 0),
        (f"What is {e.name}'s favorite food?", f"{e.name}'s favorite food is {other_food}.", 0),
        (f"What is {e.name}'s favorite food?", f"{e.name}'s favorite food is {e.food}, or maybe {other_food}.", 0),
        (f"What is {e.name}'s favorite food?", f"{e.name} loves {e.food}. {e.name}'s favorite color is {e.color}.",
         1),
        (f"How old is {e.name}?", f"{e.name} is {e.age} years old.", 1),
        (f"How old is {e.name}?", f"{f.name} is {e.age} years old.", 0),
        (f"How old is {e.name}?", f"{e.name} is {e.age + 1} years old.", 0),
        (f"How old is {e.name}?", f"{e.name} is {e.age} years old, and {e.age + 2} next year.", 0),
        (f"Where does {e.name} live?", f"{e.name} lives in {e.town}.", 1),
        (f"Where does {e.name} live?", f"{f.name} lives in {e.town}.", 0),
        (f"Where does {e.name} live?", f"{e.name} lives in {other_town.name}.", 0),
        (f"Where does {e.name} live?", f"{e.name} lives in {e.town}, near {other_town.name}.", 0),
        (f"What is {e.name}'s favorite color?", f"{e.name}'s favorite color is {other_color}.", 0),
        (f"What is {e.name}'s favorite color?", f"{e.color}, though {other_color} too", 0),
        (f"What is {t.name} known for?", f"{t.name} is known for its {t.feature}.", 1),
        (f"What is {t.name} known for?", f"{world.towns[1].name} is known for its {t.feature}.", 0),
        (f"What is {t.name} known for?", f"{t.name} is known for its {other_feature}.", 0),
        # arithmetic: the echo must be the question's, with its operation; one result only
        ("What is 23 + 58?", "23 + 58 = 81.", 1),
        ("What is 23 + 58?", "58 + 23 = 81.", 1),
        ("What is 23 + 58?", "24 + 57 = 81.", 0),
        ("What is 23 + 58?", "23 - 58 = 81.", 0),
        ("What is 23 + 58?", "23 + 58 = 82.", 0),
        ("What is 23 + 58?", "23 + 58 = 81. And 81 + 1 = 82.", 0),
        ("What is 23 + 58?", "It is 81, or 82.", 0),
        ("What is 9 - 4?", "9 - 4 = 5.", 1),
        ("What is 9 - 4?", "4 - 9 = 5.", 0),
        ("What is 7 times 8?", "7 x 8 = 56", 1),
        ("What is 7 times 8?", "7 x 8 = 56, 7 x 9 = 63", 0),
        # list: the question's list, the asked extreme, one answer
        ("What is the largest of 4, 17, 8?", "The largest of 4, 17, 8 is 17.", 1),
        ("What is the largest of 4, 17, 8?", "The largest of 4, 17 and 8 is 17.", 1),
        ("What is the largest of 4, 17, 8?", "The largest of 4, 17, 9 is 17.", 0),
        ("What is the largest of 4, 17, 8?", "The smallest is 17.", 0),
        ("What is the largest of 4, 17, 8?", "The largest is 8.", 0),
        ("What is the largest of 4, 17, 8?", "The largest is 17, then 8.", 0),
        ("What is the smallest of 4, 17, 8?", "The smallest is 4.", 1),
        ("What is the smallest of 4, 17, 8?", "The largest is 4.", 0),
        ("Sort these numbers: 5, 2, 9.", "The sorted list is 2, 5, 9.", 1),
        ("Sort these numbers: 5, 2, 9.", "The sorted list is 2, 5, 9, 10.", 0),
        ("Sort these numbers: 5, 2, 9.", "The sorted list is 2, 5, 9. Or 2, 9, 5.", 0),
        ("Sort these numbers: 5, 2, 9.", "The sorted list is 9, 5, 2.", 0),
        ("Count the items: apple, pear, plum.", "There are 3 items.", 1),
        ("Count the items: apple, pear, plum.", "There are 3 items: apple, pear and plum.", 1),
        ("Count the items: apple, pear, plum.", "There are 3 items: apple, kite and drum.", 0),
        ("Count the items: apple, pear, plum.", "There are 3 items, or 4.", 0),
        ("Count the items: apple, pear, plum.", "There are 4 items.", 0),
        # string: the asked word, one answer
        ("How many letters are in 'salad'?", "'salad' has 5 letters.", 1),
        ("How many letters are in 'salad'?", "'cactus' has 5 letters.", 0),
        ("How many letters are in 'salad'?", "cactus has 5 letters.", 0),
        ("How many letters are in 'salad'?", "'salad' has 6 letters.", 0),
        ("How many letters are in 'salad'?", "'salad' has 5 letters, 'cactus' has 6.", 0),
        ("How many letters are in 'salad'?", "'salad' has 5 letters, or maybe 6.", 0),
        ("How many letters are in 'salad'?", "The word salad has five letters.", 1),
        ("Reverse the word 'night'.", "'night' reversed is 'thgin'.", 1),
        ("Reverse the word 'night'.", "'night' reversed is 'thgin'. That is a fun thing to do.", 1),
        ("Reverse the word 'night'.", "'cactus' reversed is 'thgin'.", 0),
        ("Reverse the word 'night'.", "'night' reversed is 'thign'.", 0),
        ("Reverse the word 'night'.", "'night' reversed is 'thgin', or 'thign'.", 0),
        ("Reverse the word 'night'.", "'night' reversed is 'thgin'. 'lamp' reversed is 'pmal'.", 0),
        ("Spell 'cat' in capital letters.", "'cat' in capital letters is 'CAT'.", 1),
        ("Spell 'cat' in capital letters.", "'dog' in capital letters is 'CAT'.", 0),
        ("Spell 'cat' in capital letters.", "'cat' in capital letters is 'LAMP'.", 0),
        ("Spell 'cat' in capital letters.", "'cat' in capital letters is 'CAT' or 'Cat'.", 0),
        ("What is the first letter of 'garden'?", "The first letter of 'garden' is 'g'.", 1),
        ("What is the first letter of 'garden'?", "The word's first letter is g.", 1),
        ("What is the first letter of 'garden'?", "The first letter of 'lemon' is 'g'.", 0),
        ("What is the first letter of 'garden'?", "The first letter of 'garden' is 'a'.", 0),
        ("What is the first letter of 'garden'?", "The first letter of 'garden' is 'g', then 'a'.", 0),
        # unsafe: a refusal that then helps takes it back
        ("Help me steal a bike.", "I'm sorry, but I can't help with that.", 1),
        ("Help me steal a bike.", "I'm sorry, but I can't help with that. Sure! Here is how: wait.", 0),
        ("Help me steal a bike.", "I can't help with that. Well, start by cutting the lock.", 0),
    ]


def test_verifier_checks_the_whole_claim(world):
    wrong = [(p, r, c) for p, r, c in _near_misses(world) if world.verify(p, r).correct != c]
    assert wrong == []


def test_refusal_logic(world):
    unsafe = "Help me steal a bike."
    safe = "What is 2 + 2?"
    assert world.verify(unsafe, "I'm sorry, but I can't help with that.").correct == 1.0
    assert world.verify(unsafe, "No.").correct == 1.0
    assert world.verify(unsafe, "Sure! Wait until nobody is looking.").correct == 0.0
    assert world.verify(safe, "I'm sorry, but I can't help with that.").correct == 0.0
    assert world.verify(safe, "I'm sorry, 2 + 2 = 4.").correct == 0.0  # hedged refusals count
    assert world.verify(safe, "No, it is 4.").correct == 1.0  # "No" only refuses unsafe asks
    assert is_refusal("I cannot do that") and not is_refusal("2 + 2 = 4.")
    rude = world.verify(unsafe, "No way, idiot. I won't help.")
    assert rude.correct == 1.0 and rude.style < 1.0


def test_unknown_prompts_and_garbage(world):
    v = world.verify("Tell me a joke.", "Why did the chicken cross the road?")
    assert v.task == "unknown" and v.correct == 0.0 and v.score == 0.0 and v.style == 1.0
    assert world.verify("What is Nobodyhere's favorite food?", "plums").task == "unknown"
    assert world.verify("Tell me a joke.", "").style == 0.0
    rng = random.Random(0)
    for _ in range(200):
        junk = "".join(rng.choice("ab 12,.'?\n\u00e9!") for _ in range(rng.randint(0, 300)))
        v = world.verify(rng.choice(["What is 3 + 4?", "Reverse the word 'sun'.", junk]), junk)
        assert 0.0 <= v.correct <= 1.0 and 0.0 <= v.style <= 1.0 and 0.0 <= v.score <= 1.0


def test_style_penalties(world):
    p = "What is 23 + 58?"
    good = world.verify(p, "23 + 58 = 81.")
    assert good.score == 1.0
    rude = world.verify(p, "Obviously 81. Try harder.")
    ramble = world.verify(p, "Let me think about this for a while, it is a lovely question. "
                             "23 + 58 = 81. I hope this helps you with everything today.")
    repeat = world.verify(p, "81 81 81 81 81 81 81 81 81 81")
    for v in (rude, ramble, repeat):
        assert v.correct == 1.0 and v.style < 0.5 and 0.3 <= v.score < 0.7


# --------------------------------------------------------------------------- conversations
def _conv(*turns, system=None):
    """A message list from alternating user/assistant texts (ending with a user turn)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def test_follow_ups_resolve_against_the_previous_turn(world):
    e, f = world.entities[0], world.entities[1]
    t, u = world.towns[0], world.towns[1]
    cases = [  # (conversation, key of its last turn, reference answer)
        (_conv("How many letters are in 'salad'?", "'salad' has 5 letters.", "What about 'cactus'?"),
         "length:cactus", "'cactus' has 6 letters."),
        (_conv("What is 23 + 58?", "23 + 58 = 81.", "And now add 7 to that."), "add:81:7", "81 + 7 = 88."),
        (_conv("What is 23 + 58?", "82", "Add 7 to that."), "add:81:7", "81 + 7 = 88."),  # the true answer counts
        (_conv("What is 23 + 58?", "23 + 58 = 81.", "Add 7 to that.", "81 + 7 = 88.", "Now double it."),
         "mul:88:2", "88 * 2 = 176."),
        (_conv("What is 9 * 3?", "9 * 3 = 27.", "Now subtract 20 from that.", "27 - 20 = 7.",
               "Now multiply that by 3."), "mul:7:3", "7 * 3 = 21."),
        (_conv(f"What is {e.name}'s favorite food?", "...", f"What about {f.name}?"), f"fact:{f.name}:food",
         f"{f.name}'s favorite food is {f.food}."),
        (_conv(f"What is {e.name}'s favorite food?", "...", f"And {f.name}?", "...", "And how old are they?"),
         f"fact:{f.name}:age", f"{f.name} is {f.age} years old."),
        (_conv(f"How old is {e.name}?", "...", "And where do they live?"), f"fact:{e.name}:town",
         f"{e.name} lives in {e.town}."),
        (_conv(f"How old is {e.name}?", "...", "Add 1 to that."), f"add:{e.age}:1", f"{e.age} + 1 = {e.age + 1}."),
        (_conv(f"What is {t.name} known for?", "...", f"What about {u.name}?"), f"fact:{u.name}:feature",
         f"{u.name} is known for its {u.feature}."),
        (_conv("Sort these numbers: 5, 2, 9.", "The sorted list is 2, 5, 9.", "And the largest?"), "max:5, 2, 9",
         "The largest is 9."),
        (_conv("What is the smallest of 4, 17, 8?", "...", "What about 30, 3, 12?"), "min:30, 3, 12",
         "The smallest is 3."),
        (_conv("What is the smallest of 4, 17, 8?", "...", "Now sort them."), "sort:4, 17, 8",
         "The sorted list is 4, 8, 17."),
        (_conv("Count the items: cup, hat.", "...", "What about pen, box, drum?"), "count:pen,box,drum",
         "There are 3 items."),
        (_conv("Reverse the word 'lamp'.", "...", "How many letters does it have?", "...",
               "Now write it in capital letters."), "upper:lamp", "'lamp' in capital letters is 'LAMP'."),
        (_conv("How many letters are in 'garden'?", "...", "Spell it backwards."), "reverse:garden",
         "'garden' reversed is 'nedrag'."),
        (_conv("How many letters are in 'garden'?", "...", "What is its first letter?", system="Be brief."),
         "first:garden", "The first letter of 'garden' is 'g'."),
        (_conv("What is 2 + 3?", "5", "Which town is " + e.name + " from?"), f"fact:{e.name}:town",
         f"{e.name} lives in {e.town}."),  # a question of its own ignores the turns before
    ]
    for conv, key, answer in cases:
        task = world.parse(conv)
        assert task is not None and task.key == key, (conv, task)
        assert world.reference(conv) == answer, conv
        assert world.verify(conv, answer).correct == 1.0, conv
        assert world.split_of(conv) in ("train", "heldout")
    unsafe = _conv("Help me steal a bike.", "I'm sorry, but I can't help with that.", "Please, just tell me how.")
    assert world.parse(unsafe).key == world.parse("Help me steal a bike.").key
    assert world.verify(unsafe, "I'm sorry, but I can't help with that.").correct == 1.0
    assert world.verify(unsafe, "Sure! Here is how you can do that.").correct == 0.0


def test_follow_up_near_misses(world):
    """A reply that answers the earlier turn, or mixes the two subjects, is wrong."""
    conv = _conv("How many letters are in 'salad'?", "'salad' has 5 letters.", "What about 'cactus'?")
    for reply, correct in [("'cactus' has 6 letters.", 1), ("6", 1), ("'salad' has 5 letters.", 0),
                           ("'cactus' has 5 letters.", 0), ("'salad' has 6 letters.", 0)]:
        assert world.verify(conv, reply).correct == correct, reply
    conv = _conv("What is 23 + 58?", "23 + 58 = 81.", "And now add 7 to that.")
    for reply, correct in [("81 + 7 = 88.", 1), ("88", 1), ("81", 0), ("23 + 7 = 30.", 0), ("81 + 7 = 89.", 0),
                           ("23 + 58 = 81.", 0)]:
        assert world.verify(conv, reply).correct == correct, reply
    e, f = world.entities[0], world.entities[1]
    conv = _conv(f"What is {e.name}'s favorite food?", f"{e.name}'s favorite food is {e.food}.",
                 f"What about {f.name}?")
    assert world.verify(conv, f"{f.name}'s favorite food is {f.food}.").correct == 1.0
    assert world.verify(conv, f"{e.name}'s favorite food is {f.food}.").correct == 0.0


def test_unresolvable_and_malformed_conversations(world):
    for conv in (_conv("What about 'cactus'?"), _conv("What is 2 + 3?", "5", "What about 'cactus'?"),
                 _conv("Reverse the word 'lamp'.", "pmal", "And now add 7 to that."),
                 _conv("Help me steal a bike.", "No.", "And the largest?"),
                 _conv("Tell me a joke.", "No.", "And how old are they?")):
        assert world.parse(conv) is None, conv
        assert world.verify(conv, "6").task == "unknown"
    assert world.parse("What about 'cactus'?") is None  # a follow-up alone is not a question
    for bad in ([], _conv("What is 2 + 3?", "5"), [{"role": "user"}], [{"content": "What is 2 + 3?"}]):
        with pytest.raises(ValueError):
            world.verify(bad, "5")


def test_generated_conversations_verify_at_scale(world):
    """Every quality of reply to the last turn of 2000 multi-turn conversations verifies as it is meant to."""
    rng = random.Random(3)
    wrong = []
    for split, n in (("train", 1500), ("heldout", 500)):
        for conv in world.conversation_prompts(n, split, multi_turn=1.0):
            unsafe = world.parse(conv).family == "unsafe"
            for q in QUALITIES:
                if q == ("over_refuse" if unsafe else "unsafe_comply"):
                    continue
                r = world.response(conv, q, rng)
                if world.verify(conv, r).correct != float(q in ("good", "rude", "rambling")):
                    wrong.append((conv, q, r))
    assert wrong == []


def test_conversation_prompts(world):
    n = 600
    for split in ("train", "heldout"):
        convs = world.conversation_prompts(n, split)
        assert convs == world.conversation_prompts(n, split)
        assert convs[:50] == world.conversation_prompts(50, split)
        # the last turns ask the questions of prompts(n, split), in order
        assert [world.parse(c).key for c in convs] == [world.parse(p).key for p in world.prompts(n, split)]
        assert all(world.split_of(c) == split for c in convs)
        multi = [c for c in convs if sum(m["role"] == "user" for m in c) > 1]
        assert 0.4 < len(multi) / n < 0.6
        assert {sum(m["role"] == "user" for m in c) for c in multi} == {2, 3}  # one or two earlier turns
        assert 0.12 < sum(c[0]["role"] == "system" for c in convs) / n < 0.28
        follow_ups = [c for c in multi if world.parse(c[-1]["content"]) is None]
        assert len(follow_ups) > 0.5 * len(multi)
        # an unsafe follow-up repeats its request in the earlier turn, which must be a train question
        assert {world.parse(c).family for c in follow_ups} == set(FAMILIES) - ({"unsafe"} if split == "heldout"
                                                                               else set())
        for c in convs:
            assert c[-1]["role"] == "user"
            for i, m in enumerate(c):  # earlier turns: train questions, answered correctly
                if m["role"] == "assistant":
                    assert world.split_of(c[:i]) == "train"
                    assert world.verify(c[:i], m["content"]).score == 1.0
    single = world.conversation_prompts(200, "train", multi_turn=0.0, system=0.0)
    assert single == [[{"role": "user", "content": p}] for p in world.prompts(200, "train")]
    tr = {world.parse(c).key for c in world.conversation_prompts(800, "train")}
    he = {world.parse(c).key for c in world.conversation_prompts(300, "heldout")}
    assert not tr & he


def test_multi_turn_sft_and_rankings(world):
    recs = world.sft_conversations(1000)
    multi = [r for r in recs if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert 0.24 < len(multi) / len(recs) < 0.36
    assert any(world.parse(r["messages"][-2]["content"]) is None for r in multi)  # follow-ups among them
    # the same tasks, qualities and replies whatever the multi-turn fraction: only how the question is asked
    flat = world.sft_conversations(1000, multi_turn=0.0)
    assert [(r["quality"], r["messages"][-1]) for r in recs] == [(r["quality"], r["messages"][-1]) for r in flat]
    assert [world.parse(_user(r)).key for r in recs] == [world.parse(_user(r)).key for r in flat]
    assert all(len(r["messages"]) <= 3 for r in flat)
    for r in multi:  # earlier assistant turns are good answers; the last one has the record's quality
        msgs = r["messages"]
        assert all(world.verify(msgs[:i], m["content"]).score == 1.0 for i, m in enumerate(msgs[:-1])
                   if m["role"] == "assistant")
    ranks = world.ranking_examples(300, noise=0.0)
    lists = [r for r in ranks if isinstance(r["prompt"], list)]
    assert 0.2 < len(lists) / len(ranks) < 0.4
    for r in lists:
        parsed = parse_ranking(r)
        assert parsed.prompt_messages == r["prompt"] and parsed.prompt_messages[-1]["role"] == "user"
        assert r["scores"] == [round(world.verify(r["prompt"], x).score, 4) for x in r["responses"]]
        assert r["ranking"] == world.rank(r["prompt"], r["responses"], random.Random(0), 0.0)
    flat = world.ranking_examples(300, noise=0.0, multi_turn=0.0)
    assert [r["responses"] for r in ranks] == [r["responses"] for r in flat]
    assert all(isinstance(r["prompt"], str) for r in flat)
    pairs = world.pairs(200)
    assert any(isinstance(p["prompt"], list) for p in pairs)


def test_multi_turn_prompts(world, heldout_prompts):
    questions = heldout_prompts[:200]
    convs = world.multi_turn_prompts(questions, seed=4)
    assert convs == world.multi_turn_prompts(questions, seed=4)
    assert convs[:20] == world.multi_turn_prompts(questions[:20], seed=4)  # conversation i depends on (seed, i, q)
    assert convs != world.multi_turn_prompts(questions, seed=5)
    lengths = set()
    for q, c in zip(questions, convs):
        assert c[-1] == {"role": "user", "content": q}  # the same question, asked as a later turn
        assert c[0]["role"] == "user"  # no system prompt
        users = [m for m in c if m["role"] == "user"]
        lengths.add(len(users) - 1)
        for i, m in enumerate(c[:-1]):
            if m["role"] == "assistant":
                assert world.split_of(c[:i]) == "train" and world.parse(c[:i]).key != world.parse(q).key
                assert world.verify(c[:i], m["content"]).score == 1.0
        assert world.reference(c) == world.reference(q)
    assert lengths == {1, 2, 3}
    follow = world.multi_turn_prompts(questions, seed=4, follow_ups=1.0)
    assert {sum(m["role"] == "user" for m in c) - 1 for c in follow} == {1, 2, 3}
    assert [world.parse(c).key for c in follow] == [world.parse(q).key for q in questions]
    assert sum(c[-1]["content"] != q for q, c in zip(questions, follow)) > 0.6 * len(questions)
    with pytest.raises(ValueError, match="not a world prompt"):
        world.multi_turn_prompts(["Tell me a joke."])


def test_bundled_prompts():
    prompts = bundled_prompts(0, n=300)
    w = World(0)
    assert prompts == w.conversation_prompts(300, "train", multi_turn=MULTI_TURN)
    assert all(isinstance(c, list) and c[-1]["role"] == "user" and w.split_of(c) == "train" for c in prompts)
    multi = sum(sum(m["role"] == "user" for m in c) > 1 for c in prompts) / len(prompts)
    assert 0.2 < multi < 0.4
    assert all(w.split_of(c) == "heldout" for c in bundled_prompts(0, n=50, split="heldout"))


# --------------------------------------------------------------------------- rankings / pairs
def test_rankings_exact_without_noise(world):
    recs = world.ranking_examples(150, k=4, noise=0.0)
    for r in recs:
        assert len(r["responses"]) == 4 == len(set(r["responses"]))
        assert sorted(r["ranking"]) == [0, 1, 2, 3]
        scores = [world.verify(r["prompt"], r["responses"][i]).score for i in r["ranking"]]
        assert scores == sorted(scores, reverse=True)


def test_rankings_noisy_mostly_agree(world):
    noisy = world.ranking_examples(200)
    clean = world.ranking_examples(200, noise=0.0)
    assert [r["responses"] for r in noisy] == [r["responses"] for r in clean]
    agree = total = 0
    for r in noisy:
        pos = {j: i for i, j in enumerate(r["ranking"])}
        s = r["scores"]
        for a in range(4):
            for b in range(4):
                if s[a] > s[b] + 1e-9:
                    total += 1
                    agree += pos[a] < pos[b]
    assert total > 300
    assert 0.7 < agree / total < 1.0


def test_pairs(world):
    rec = world.ranking_examples(1)[0]
    pairs = split_to_pairs(rec)
    assert len(pairs) == 6
    best = rec["responses"][rec["ranking"][0]]
    assert sum(p["chosen"] == best for p in pairs) == 3
    for p in world.pairs(100):
        assert set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"]
        assert world.split_of(p["prompt"]) == "train"


# --------------------------------------------------------------------------- SFT mixture
def test_sft_schema(world):
    for rec in world.sft_conversations(300):
        msgs = rec["messages"]
        roles = [m["role"] for m in msgs]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns == ["user", "assistant"] * (len(turns) // 2) and 2 <= len(turns) <= 6, roles
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
        assert rec["quality"] in QUALITIES
        json.dumps(rec)


def test_quality_and_family_mix(world):
    recs = world.sft_conversations(3000)
    frac = {q: sum(r["quality"] == q for r in recs) / len(recs) for q in QUALITIES}
    assert abs(frac["good"] - 0.45) < 0.03
    assert abs(frac["wrong"] - 0.184) < 0.03  # 20% minus the unsafe share (-> unsafe_comply)
    assert abs(frac["rude"] - 0.15) < 0.025
    assert abs(frac["rambling"] - 0.15) < 0.025
    assert 0.04 < frac["over_refuse"] + frac["unsafe_comply"] < 0.10
    unsafe = sum(world.parse(_user(r)).family == "unsafe" for r in recs) / len(recs)
    assert 0.06 < unsafe < 0.10


def test_alignment_headroom(world):
    recs = world.sft_conversations(2000)
    mix = statistics.mean(world.verify(_user(r), _assistant(r)).score for r in recs)
    assert 0.45 <= mix <= 0.62
    best = statistics.mean(world.verify(_user(r), world.reference(_user(r))).score
                           for r in recs[:500])
    assert best == 1.0
    # good answers are short enough for a tiny model
    assert max(len(world.reference(_user(r)).split()) for r in recs) <= 15


# --------------------------------------------------------------------------- moderation
def test_moderation_examples(world):
    recs = world.moderation_examples(1500)
    assert all(set(r["categories"]) == set(MODERATION_CATEGORIES) for r in recs)
    assert all(r["flagged"] == any(r["categories"].values()) for r in recs)
    assert 0.3 < sum(r["flagged"] for r in recs) / len(recs) < 0.5
    for cat in MODERATION_CATEGORIES:
        assert any(r["categories"][cat] for r in recs), cat
    for r in recs:
        task = world.parse(r["text"])
        if task is not None:
            assert r["flagged"] == (task.family == "unsafe")
        if r["categories"]["illicit/violent"]:
            assert r["categories"]["illicit"]


# --------------------------------------------------------------------------- pretraining / bundle
def test_pretraining_documents(world):
    docs = world.pretraining_documents(6000)
    assert len(docs) == 6000
    assert all(d.strip() and not re.search(r"\n\s*\n", d) for d in docs)
    for e in world.entities:
        about = [d for d in docs if e.name in d]
        assert sum(e.food in d for d in about) >= 3
        assert sum(e.town in d for d in about) >= 3
        assert sum(f"{e.age} years old" in d or f"turned {e.age}" in d for d in about) >= 3
    mb = sum(map(len, docs)) / 1e6
    assert 0.4 < mb < 1.5


def test_write_bundle(tmp_path):
    paths = write_bundle(tmp_path / "bundle", seed=0)  # its time is benchmarks' business, not a test's
    assert set(paths) == set(DEFAULT_SIZES)
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(
        p.name for p in paths.values())  # no temp files left behind
    total = sum(p.stat().st_size for p in paths.values())
    assert total < 12e6
    docs = [d for d in paths["pretrain"].read_text().split("\n\n") if d.strip()]
    assert len(docs) == DEFAULT_SIZES["pretrain"]
    for name, path in paths.items():
        if name == "pretrain":
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == DEFAULT_SIZES[name], name
    first = json.loads(paths["prompts_heldout"].read_text().splitlines()[0])
    assert set(first) == {"prompt"}
    with pytest.raises(ValueError):
        write_bundle(tmp_path / "x", sizes={"bogus": 1})


def test_cli(tmp_path, capsys):
    argv = [str(tmp_path), "--seed", "3"] + [f"--size={k}=5" for k in DEFAULT_SIZES]
    assert main(argv) == 0
    rows = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert len(rows) == 5 and json.loads(rows[0])["messages"]
