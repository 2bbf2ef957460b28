"""The built-in world and the token files."""
import numpy as np

from engine.data import ATTRIBUTES, FEMALE_FIRST, World, read_tokens, write_tokens


def test_world_is_seeded_and_split_in_disjoint_halves():
    world = World(n_people=40, seed=3)
    assert world.people() == World(n_people=40, seed=3).people()
    assert world.people() != World(n_people=40, seed=4).people()
    seen, held_out = world.split()
    assert len(seen) == len(held_out) == 20
    assert not {p.name for p in seen} & {p.name for p in held_out}


def test_every_fact_is_in_the_documents_in_several_phrasings_and_orders():
    world = World(n_people=10, seed=0, bios_per_person=4)
    docs = world.documents()
    assert len(docs) == 40
    for p in world.people():
        bios = [d for d in docs if d.count(p.name) == len(ATTRIBUTES)]
        assert len(bios) == 4
        for a in ATTRIBUTES:
            assert all(getattr(p, a) in b for b in bios)
        assert len(set(bios)) > 1  # phrasings and sentence order vary


def test_biographies_put_one_sentence_per_line_each_starting_as_an_answer_would():
    world = World(n_people=10, seed=0, bios_per_person=2)
    for doc in world.documents():
        lines = doc.split("\n")
        assert len(lines) == len(ATTRIBUTES) and all(line.endswith(".") for line in lines)
        names = {p.name for p in world.people()}
        assert sum(any(line.startswith(n) for n in names) for line in lines) >= 2  # most phrasings open with the name


def test_replayed_biographies_cover_everyone_and_are_trained_on_every_token():
    from engine.data import replay_items

    world = World(n_people=10, seed=0, finetune_bios=25)
    docs = world.replay_documents()
    assert len(docs) == 25 and docs == world.replay_documents()
    for p in world.people():  # everyone, held-out people included, two or three times
        bios = [d for d in docs if d.count(p.name) == len(ATTRIBUTES)]
        assert len(bios) in (2, 3) and all(getattr(p, a) in b for b in bios for a in ATTRIBUTES)

    class Chars:  # a stand-in tokenizer: one id per character
        bos_id = 0

        @staticmethod
        def encode_batch(texts):
            return [[ord(c) for c in t] for t in texts]

    items = replay_items("builtin", world.to_dict(), Chars)
    assert [ids[1:] for ids, _ in items] == Chars.encode_batch(docs)
    assert all(ids[0] == 0 and mask == [0] + [1] * (len(ids) - 1) for ids, mask in items)
    assert replay_items("chats.jsonl", world.to_dict(), Chars) == []
    assert World(n_people=10).finetune_bios > 0  # the built-in fine-tuning replays by default


def test_conversations_ask_only_about_the_fine_tuning_half():
    world = World(n_people=10, seed=0, multi_turn_chats=50)
    seen, held_out = world.split()
    convs = world.conversations()
    assert len(convs) == len(seen) * len(ATTRIBUTES) + 50
    asked = " ".join(m["content"] for c in convs for m in c if m["role"] != "assistant")
    assert all(p.name in asked for p in seen) and not any(p.name in asked for p in held_out)
    for (q, answer), conv in zip(World.qa_pairs(seen), convs):
        assert conv == [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def test_multi_turn_chats_follow_up_switch_person_and_sometimes_have_a_system_message():
    world = World(n_people=20, seed=0, multi_turn_chats=300)
    seen, _ = world.split()
    facts = {answer for p in seen for _, answer in World.qa_pairs([p])}
    chats = world.conversations()[len(seen) * len(ATTRIBUTES):]
    turns = [[m for m in chat if m["role"] != "system"] for chat in chats]
    assert {len(t) // 2 for t in turns} == {2, 3, 4}
    assert 0.15 < sum(chat[0]["role"] == "system" for chat in chats) / len(chats) < 0.45
    follow_ups = switches = 0
    for chat in turns:
        assert [m["role"] for m in chat] == ["user", "assistant"] * (len(chat) // 2)
        assert all(m["content"] in facts for m in chat[1::2])  # every answer: a whole fact sentence, full name
        for before, question, answer in zip(chat[1::2], chat[2::2], chat[3::2]):
            previous_person = " ".join(before["content"].split()[:2])
            said = set(question["content"].rstrip("?").split()) & {"he", "she"}
            if said:
                follow_ups += 1
                assert answer["content"].startswith(previous_person)  # "he"/"she" is who the chat was about
                assert said == {"she" if previous_person.split()[0] in FEMALE_FIRST else "he"}
            else:
                switches += 1
                assert " ".join(answer["content"].split()[:2]) in question["content"]
    assert follow_ups > 100 and switches > 100


def test_eval_chats_are_fixed_and_about_the_given_people_only():
    world = World(n_people=20, seed=0)
    _, held_out = world.split()
    chats = world.eval_chats(held_out)
    assert chats == world.eval_chats(held_out) and len(chats) == 200
    assert all(sum(m["role"] == "assistant" for m in chat) == 3 for chat in chats)
    names = {p.name for p in held_out}
    assert all(" ".join(m["content"].split()[:2]) in names for chat in chats for m in chat if m["role"] == "assistant")


def test_token_files_round_trip_and_pick_the_smallest_dtype(tmp_path):
    tokens = np.array([0, 5, 65535, 7])
    assert read_tokens(write_tokens(tokens, tmp_path / "small", 65536)).dtype == np.uint16
    big = read_tokens(write_tokens(np.array([0, 70000]), tmp_path / "big", 100_000))
    assert big.dtype == np.uint32 and list(big) == [0, 70000]
    assert list(read_tokens(tmp_path / "small.bin")) == list(tokens)
