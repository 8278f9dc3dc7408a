from delia.data.diversify import SentenceEmbedder
from delia.data.magpie import deduplicate, diversity, user_prefix


def test_user_prefix_is_the_template_up_to_the_user_text(tiny):
    _, tokenizer = tiny
    assert user_prefix(tokenizer) == "<|im_start|>user\n"


def test_deduplicate_drops_copies_and_near_copies():
    embed = SentenceEmbedder()
    queries = ["Give three tips for staying healthy.", "give three tips for staying healthy",
               "Give 3 tips for staying healthy.", "Explain how a rainbow forms.", "", "ok"]
    assert deduplicate(queries, embed, threshold=0.9) == ["Give three tips for staying healthy.",
                                                          "Explain how a rainbow forms."]


def test_diversity_is_higher_for_varied_queries():
    embed = SentenceEmbedder()
    same = ["Tell me a joke about cats."] * 2 + ["Tell me a joke about a cat."]
    varied = ["Tell me a joke about cats.", "How do vaccines work?", "Write a haiku on autumn rain."]
    a, b = diversity(same, embed), diversity(varied, embed)
    assert b["distinct_1"] > a["distinct_1"] and b["distinct_2"] > a["distinct_2"]
    assert b["embedding_spread"] > a["embedding_spread"] >= 0


def test_magpie_sample_stage_end_to_end(tiny_model_dir, tmp_path):
    from delia.config import load_config
    from delia.pipeline import stage_sample, stage_task

    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", "task.train_rows=4",
                             "task.eval_rows=1", "mix.ratio=1", "sample.queries=magpie", "sample.max_new_tokens=4"])
    stage_task(cfg)
    out = stage_sample(cfg)["outputs"]
    assert out["queries"]["diversity"]["magpie"]["n"] == out["requested"] <= 4
    assert (tmp_path / "sample" / "magpie_queries.jsonl").exists()
