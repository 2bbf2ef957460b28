"""The built-in world and the token files."""
import numpy as np

from engine.data import ATTRIBUTES, World, read_tokens, write_tokens


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


def test_conversations_ask_only_about_the_fine_tuning_half():
    world = World(n_people=10, seed=0)
    seen, held_out = world.split()
    convs = world.conversations()
    assert len(convs) == len(seen) * len(ATTRIBUTES)
    asked = " ".join(c[0]["content"] for c in convs)
    assert all(p.name in asked for p in seen) and not any(p.name in asked for p in held_out)
    for (q, answer), conv in zip(World.qa_pairs(seen), convs):
        assert conv == [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def test_token_files_round_trip_and_pick_the_smallest_dtype(tmp_path):
    tokens = np.array([0, 5, 65535, 7])
    assert read_tokens(write_tokens(tokens, tmp_path / "small", 65536)).dtype == np.uint16
    big = read_tokens(write_tokens(np.array([0, 70000]), tmp_path / "big", 100_000))
    assert big.dtype == np.uint32 and list(big) == [0, 70000]
    assert list(read_tokens(tmp_path / "small.bin")) == list(tokens)
