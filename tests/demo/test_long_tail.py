"""The long tail: held-out entities the base's corpus never mentions and the expert's does."""

from __future__ import annotations

from calibserve.demo.build import make_materials
from calibserve.demo.settings import DemoSettings, WorldSettings, tiny_settings
from calibserve.demo.world import SPLITS


def _with_tail(fraction: float) -> DemoSettings:
    settings = tiny_settings()
    world = settings.world.model_copy(update={"long_tail_fraction": fraction})
    return settings.model_copy(update={"world": world})


def test_the_base_corpus_never_names_a_long_tail_entity() -> None:
    settings = tiny_settings().model_copy(update={"world": WorldSettings(
        qa_entities=8, heldout_entities_per_split=4, mentions_per_fact=4, qa_docs_per_fact=1,
        eval_questions_per_fact=1, open_prompts=4, long_tail_fraction=0.5)})
    mat = make_materials(settings, seed=0)
    tail = set(mat.world.long_tail)
    # Half of each split's entities, the same half in the MC and the short-answer items.
    for split in SPLITS:
        assert len(tail & set(mat.world.heldout[split])) == 2
        for items in (mat.splits[split], mat.short[split]):
            assert {it["entity"] for it in items if it["long_tail"]} == (
                tail & set(mat.world.heldout[split]))
    words = {mat.tokenizer.convert_tokens_to_ids(e) for e in tail}
    assert not any(words & set(doc) for doc in mat.base_doc_ids)
    # The expert reads every fact of them, 4 mentions each (and the base's whole corpus too).
    expert_mentions = sum(1 for doc in mat.doc_ids if words & set(doc))
    assert expert_mentions >= len(tail) * 4 * 4
    assert len(mat.doc_ids) - len(mat.base_doc_ids) == expert_mentions


def test_no_long_tail_leaves_every_draw_as_it_was() -> None:
    none, some = make_materials(_with_tail(0.0), 0), make_materials(_with_tail(0.4), 0)
    assert none.world.long_tail == [] and none.base_doc_ids == none.doc_ids
    # The tail draws nothing: the same world, corpus, splits and golds, only the flag differs.
    assert some.doc_ids == none.doc_ids and some.sft_ids == none.sft_ids
    strip = [{k: v for k, v in it.items() if k != "long_tail"} for it in some.splits["test"]]
    assert strip == [{k: v for k, v in it.items() if k != "long_tail"}
                     for it in none.splits["test"]]
    assert _with_tail(0.0).digest(0) != _with_tail(0.4).digest(0)
