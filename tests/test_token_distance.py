import torch

from delia.analysis.token_distance import first_middle_last, plot_distances, token_keyword_distances
from delia.model.tokens import add_new_tokens


def test_zero_for_itself_and_moves_with_the_row(tiny, tmp_path):
    model, tokenizer = tiny
    add_new_tokens(model, tokenizer, ["<sep>"], "random")
    same = token_keyword_distances(model, tokenizer, "<sep>", ["<sep>"])["<sep>"]
    assert all(v == 0 for v in same["l2"]) and same["embedding_l2"] == 0
    assert all(abs(c - 1) < 1e-4 for c in same["cosine"])
    before = token_keyword_distances(model, tokenizer, "<sep>", ["json"])["json"]
    assert len(before["l2"]) == model.config.num_hidden_layers and all(v > 0 for v in before["l2"])
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    json_id = tokenizer(" json", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # move <sep>'s row onto the keyword's: the embedding distance vanishes
        model.get_input_embeddings().weight[sep] = model.get_input_embeddings().weight[json_id].mean(0)
    after = token_keyword_distances(model, tokenizer, "<sep>", ["json"])["json"]
    assert after["embedding_l2"] < 1e-5 < before["embedding_l2"]
    assert after["l2"] != before["l2"]
    assert first_middle_last([1, 2, 3, 4, 5]) == (1, 3, 5)


def test_plot_is_written(tiny, tmp_path):
    model, tokenizer = tiny
    add_new_tokens(model, tokenizer, ["<sep>"], "mean")
    res = {"untouched": token_keyword_distances(model, tokenizer, "<sep>", ["json", "thought"])}
    plot_distances(res, ["json", "thought"], tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
