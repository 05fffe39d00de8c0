"""EagleCollator(pack=True): one row per batch whose loss is the padded batch's, even for records
whose first token carries a label (a padded row's shift never learns it; the packed row must not
learn it from the previous record's last token)."""

import torch

from eagle_fast.data import EagleCollator
from eagle_fast.model import presets
from eagle_fast.model.eagle import EagleLlamaForCausalLM
from eagle_fast.model.splice import IGNORE_INDEX


def _records():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (7, 3, 11, 1):
        ids = torch.randint(3, 90, (n,), generator=g)
        out.append({"id": f"r{n}", "input_ids": ids, "labels": ids.clone(), "images": None})  # every token labelled
    return out


def test_packed_row_ignores_each_record_start_and_keeps_the_records():
    items = _records()
    packed = EagleCollator(pack=True)(items)
    padded = EagleCollator()(items)
    lens = [len(it["input_ids"]) for it in items]
    assert packed["input_ids"].shape == (1, sum(lens)) and packed["packed_seq_lens"].tolist() == lens
    starts = torch.tensor(lens).cumsum(0)[:-1]  # records 2..4; record 1's start is the row's, dropped by the shift
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    assert torch.equal(items[1]["labels"], items[1]["input_ids"])  # the records' own labels untouched
    # the learned-token count the trainer divides by is the padded batch's
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_packed_loss_equals_padded_loss_when_first_tokens_are_labelled():
    items = _records()
    torch.manual_seed(0)
    model = EagleLlamaForCausalLM(presets.get("eagle-tiny-clip", vocab_size=96)).eval()
    padded = EagleCollator()(items)
    packed = EagleCollator(pack=True)(items)
    with torch.no_grad():
        want = model(padded["input_ids"], padded["attention_mask"], labels=padded["labels"]).loss
        got = model(packed["input_ids"], labels=packed["labels"], packed_seq_lens=packed["packed_seq_lens"]).loss
    assert abs(float(got) - float(want)) < 1e-5 * abs(float(want)), (got, want)
